"""The demo generator on real SQLite files and bucket folders in a temporary directory."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from datamart import demo
from datamart.demo.source import PROJECT_ROOT, postgres_dsn, sqlite_path
from datamart.testing.commands import environment

ENTITY_TABLES = ["organizations", "missions", "volunteers", "applications"]
ALL_TABLES = [*ENTITY_TABLES, "stats_events"]


@dataclass
class DemoSource:
    """A generated demo: its SQLite file and bucket folder."""

    path: Path
    bucket: Path

    @property
    def url(self) -> str:
        """The SQLAlchemy-style URL of the SQLite file."""
        return f"sqlite:///{self.path}"

    def rows(self, statement: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        """Rows of a query on the source."""
        with sqlite3.connect(self.path) as conn:
            return conn.execute(statement, params).fetchall()

    def scalar(self, statement: str, params: tuple[object, ...] = ()) -> int:
        """One integer."""
        return int(self.rows(statement, params)[0][0] or 0)

    def ids(self, table: str) -> set[int]:
        """Every id of a table."""
        return {int(row[0]) for row in self.rows(f"SELECT id FROM {table}")}

    def table_hashes(self) -> dict[str, str]:
        """A hash of each table's rows in id order."""
        hashes = {}
        for table in [*ALL_TABLES, "demo_meta"]:
            digest = hashlib.sha256()
            for row in self.rows(f"SELECT * FROM {table} ORDER BY 1"):
                digest.update(repr(row).encode())
            hashes[table] = digest.hexdigest()
        return hashes

    def partner_ids(self) -> set[int]:
        """The partner ids of referentials/partners.csv."""
        with (self.bucket / "referentials" / "partners.csv").open(encoding="utf-8") as handle:
            return {int(row["partner_id"]) for row in csv.DictReader(handle)}


def _generate(root: Path, **kwargs: object) -> tuple[DemoSource, demo.DaySummary]:
    source = DemoSource(path=root / "app.sqlite", bucket=root / "bucket")
    summary = demo.generate(source_url=source.url, bucket=source.bucket, **kwargs)  # type: ignore[arg-type]
    return source, summary


@pytest.fixture(scope="module")
def day0(tmp_path_factory: pytest.TempPathFactory) -> DemoSource:
    """Scale 1, seed 42, day 0; read-only (copy it with ``fresh_copy`` to change it)."""
    source, _ = _generate(tmp_path_factory.mktemp("day0"))
    return source


@pytest.fixture
def fresh_copy(day0: DemoSource, tmp_path: Path) -> Callable[[], DemoSource]:
    """A private copy of the day-0 source and bucket."""

    def copy() -> DemoSource:
        target = DemoSource(path=tmp_path / "copy" / "app.sqlite", bucket=tmp_path / "copy" / "bucket")
        target.path.parent.mkdir(parents=True)
        with sqlite3.connect(day0.path) as src, sqlite3.connect(target.path) as dst:
            src.backup(dst)
        shutil.copytree(day0.bucket, target.bucket)
        return target

    return copy


def _check_integrity(source: DemoSource) -> None:
    """Every reference points at an existing row; every event's partner is in partners.csv."""
    assert source.scalar("SELECT count(*) FROM applications WHERE mission_id NOT IN (SELECT id FROM missions)") == 0
    assert source.scalar("SELECT count(*) FROM applications WHERE volunteer_id NOT IN (SELECT id FROM volunteers)") == 0
    assert (
        source.scalar("SELECT count(*) FROM missions WHERE organization_id NOT IN (SELECT id FROM organizations)") == 0
    )
    assert source.scalar("SELECT count(*) FROM stats_events WHERE mission_id NOT IN (SELECT id FROM missions)") == 0
    event_partners = {int(row[0]) for row in source.rows("SELECT DISTINCT partner_id FROM stats_events")}
    assert event_partners <= source.partner_ids()


def test_same_seed_gives_identical_content_and_another_seed_differs(day0: DemoSource, tmp_path: Path) -> None:
    again, _ = _generate(tmp_path / "again")
    other, _ = _generate(tmp_path / "other", seed=7)
    assert again.table_hashes() == day0.table_hashes()
    for relative in sorted(p.relative_to(day0.bucket) for p in day0.bucket.rglob("*") if p.is_file()):
        assert (again.bucket / relative).read_bytes() == (day0.bucket / relative).read_bytes(), relative
    differing = {t for t, h in other.table_hashes().items() if h != day0.table_hashes()[t]}
    assert set(ALL_TABLES) <= differing


def test_scale_1_sizes_match_the_documented_table(day0: DemoSource) -> None:
    expected = {"organizations": 200, "missions": 1_000, "volunteers": 2_000, "applications": 4_000}
    for table, rows in expected.items():
        assert day0.scalar(f"SELECT count(*) FROM {table}") == rows, table
    events = day0.scalar("SELECT count(*) FROM stats_events")
    assert 18_000 <= events <= 22_000
    assert day0.scalar("SELECT max(id) FROM stats_events") == events
    assert dict(day0.rows("SELECT key, value FROM demo_meta"))["day"] == "0"


def test_day0_shapes_calendar_and_funnel(day0: DemoSource) -> None:
    for table in ENTITY_TABLES:
        low, high = day0.rows(f"SELECT min(created_at), max(updated_at) FROM {table}")[0]
        assert "2025-10-01 00:00:00" <= str(low) and str(high) <= "2025-12-31 23:59:59", table
        assert day0.scalar(f"SELECT count(*) FROM {table} WHERE updated_at < created_at") == 0, table
    ordered = day0.rows("SELECT occurred_at FROM stats_events ORDER BY id")
    assert [row[0] for row in ordered] == sorted(row[0] for row in ordered), "ids grow with occurred_at"
    counts = dict(day0.rows("SELECT event_type, count(*) FROM stats_events GROUP BY event_type"))
    assert 0.06 <= counts["click"] / counts["impression"] <= 0.10
    assert 0.06 <= counts["application"] / counts["click"] <= 0.14
    top = [row[0] for row in day0.rows("SELECT department FROM volunteers GROUP BY 1 ORDER BY count(*) DESC LIMIT 8")]
    assert {"75", "59", "13", "69"} & set(top)
    volunteer = day0.rows(
        "SELECT email, first_name, last_name, phone, postcode, department, birth_date, id FROM volunteers"
    )
    for email, _first, _last, phone, postcode, department, birth_date, volunteer_id in volunteer:
        assert email.endswith(tuple(["example.org", "example.com", "example.net", "mail.example.fr"]))
        assert str(volunteer_id) in email
        assert phone.startswith("06") and len(phone) == 10 and phone.isdigit()
        assert len(postcode) == 5 and postcode.isdigit()
        expected_prefix = "20" if department in ("2A", "2B") else department[:2]
        assert postcode.startswith(expected_prefix), (postcode, department)
        assert "1950-01-01" <= birth_date <= "2008-12-31"
    assert len(list((day0.bucket / "exports" / "partner_reports").glob("*.parquet"))) == 7
    assert day0.partner_ids() == set(range(1, 13))
    _check_integrity(day0)


def test_fractional_scale_keeps_sensible_minimum_sizes(tmp_path: Path) -> None:
    source, summary = _generate(tmp_path, scale=0.01)
    assert summary.tables["volunteers"].inserted >= 20
    assert source.scalar("SELECT count(*) FROM volunteers WHERE department = '48'") == 3
    assert source.scalar("SELECT count(*) FROM stats_events") >= 400
    demo.advance_day(source_url=source.url, bucket=source.bucket)
    _check_integrity(source)


def test_department_48_keeps_exactly_three_volunteers(fresh_copy: Callable[[], DemoSource]) -> None:
    source = fresh_copy()
    rare = "SELECT count(*) FROM volunteers WHERE department = '48'"
    assert source.scalar(rare) == 3
    for _ in range(3):
        demo.advance_day(source_url=source.url, bucket=source.bucket)
        assert source.scalar(rare) == 3


def test_advance_day_summary_matches_the_database(fresh_copy: Callable[[], DemoSource]) -> None:
    source = fresh_copy()
    before = {table: source.ids(table) for table in ALL_TABLES}
    max_event = max(before["stats_events"])
    summary = demo.advance_day(source_url=source.url, bucket=source.bucket)
    assert (summary.day, summary.date) == (1, dt.date(2026, 1, 1))
    after = {table: source.ids(table) for table in ALL_TABLES}
    in_day = ("2026-01-01 00:00:00", "2026-01-01 23:59:59")
    for table in ALL_TABLES:
        counts = summary.tables[table]
        assert counts.inserted > 0, table
        assert len(after[table]) == len(before[table]) + counts.inserted - counts.hard_deleted, table
        assert len(after[table] - before[table]) == counts.inserted, table
        assert len(before[table] - after[table]) == counts.hard_deleted, table
        if table != "stats_events":
            changed = source.scalar(f"SELECT count(*) FROM {table} WHERE updated_at BETWEEN ? AND ?", in_day)
            assert changed == counts.inserted + counts.updated + counts.soft_deleted, table
            assert source.scalar(f"SELECT count(*) FROM {table} WHERE updated_at > ?", (in_day[1],)) == 0
    for table in ("organizations", "missions"):
        deleted = source.scalar(f"SELECT count(*) FROM {table} WHERE deleted_at BETWEEN ? AND ?", in_day)
        assert deleted == summary.tables[table].soft_deleted > 0, table
    assert summary.tables["missions"].updated > 0 and summary.tables["applications"].updated > 0
    assert summary.tables["volunteers"].hard_deleted > 0 and summary.tables["applications"].hard_deleted > 0
    erased = before["volunteers"] - after["volunteers"]
    marks = ",".join("?" * len(erased))
    assert source.scalar(f"SELECT count(*) FROM applications WHERE volunteer_id IN ({marks})", tuple(erased)) == 0
    new_events = source.rows(
        "SELECT min(occurred_at), max(occurred_at), count(*) FROM stats_events WHERE id > ?", (max_event,)
    )
    low, high, count = new_events[0]
    assert in_day[0] <= low and high <= in_day[1] and count == summary.tables["stats_events"].inserted
    assert source.scalar("SELECT max(id) FROM stats_events") == max_event + count
    report = source.bucket / "exports" / "partner_reports" / "partner_report_2026-01-01.parquet"
    assert report in summary.files and report.exists()
    table = pq.read_table(report).to_pylist()
    assert {row["report_date"] for row in table} == {dt.date(2026, 1, 1)}
    assert {row["partner_id"] for row in table} <= source.partner_ids()
    reported = sum(row["impressions"] + row["clicks"] + row["applications"] for row in table)
    assert abs(reported - count) <= 0.1 * count, "partners report roughly what we counted"
    assert dict(source.rows("SELECT key, value FROM demo_meta"))["day"] == "1"
    _check_integrity(source)


def test_a_new_partner_every_seventh_day(tmp_path: Path) -> None:
    source, _ = _generate(tmp_path, scale=0.2)
    for day in range(1, 8):
        summary = demo.advance_day(source_url=source.url, bucket=source.bucket)
        assert summary.day == day
    assert source.partner_ids() == set(range(1, 14))
    assert (source.bucket / "referentials" / "partners.csv") in summary.files
    assert source.scalar("SELECT count(*) FROM volunteers WHERE department = '48'") == 3
    _check_integrity(source)


def test_existing_missing_and_reset(tmp_path: Path) -> None:
    source = DemoSource(path=tmp_path / "app.sqlite", bucket=tmp_path / "bucket")
    assert not demo.source_exists(source.url)
    assert not source.path.exists(), "checking does not create the file"
    with pytest.raises(demo.NotGeneratedError, match="generate day 0 first"):
        demo.advance_day(source_url=source.url, bucket=source.bucket)
    demo.generate(source_url=source.url, bucket=source.bucket, scale=0.2)
    assert demo.source_exists(source.url)
    with pytest.raises(demo.SourceExistsError, match="--advance-day"):
        demo.generate(source_url=source.url, bucket=source.bucket, scale=0.2)
    demo.advance_day(source_url=source.url, bucket=source.bucket)
    summary = demo.generate(source_url=source.url, bucket=source.bucket, scale=0.2, reset=True)
    assert summary.day == 0
    assert dict(source.rows("SELECT key, value FROM demo_meta"))["day"] == "0"
    reports = sorted(p.name for p in (source.bucket / "exports" / "partner_reports").glob("*.parquet"))
    assert len(reports) == 7 and reports[-1] == "partner_report_2025-12-31.parquet"


def test_urls_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    assert sqlite_path("sqlite:///data/demo/app.sqlite") == PROJECT_ROOT / "data" / "demo" / "app.sqlite"
    assert sqlite_path("sqlite:////tmp/x.sqlite") == Path("/tmp/x.sqlite")
    assert postgres_dsn("postgresql+psycopg2://u:p@h:5/db") == "postgresql://u:p@h:5/db"
    monkeypatch.delenv("SOURCES__APP_DB__CREDENTIALS", raising=False)
    monkeypatch.delenv("SOURCES__BUCKET__BUCKET_URL", raising=False)
    assert demo.default_source_url() == f"sqlite:///{PROJECT_ROOT / 'data' / 'demo' / 'app.sqlite'}"
    assert demo.default_bucket() == PROJECT_ROOT / "data" / "bucket"
    monkeypatch.setenv("SOURCES__APP_DB__CREDENTIALS", "postgresql://u:p@h/db")
    assert demo.default_source_url() == "postgresql://u:p@h/db"
    with pytest.raises(demo.DemoError, match="unsupported source URL"):
        demo.source_exists("mysql://u@h/db")


def test_cli_refuses_an_existing_source_without_a_flag(tmp_path: Path) -> None:
    env = environment(("SOURCES__",))
    args = [sys.executable, "-m", "datamart.demo", "--source-url", f"sqlite:///{tmp_path / 'app.sqlite'}"]
    args += ["--bucket", str(tmp_path / "bucket"), "--scale", "0.2"]

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*args, *extra], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)

    first = run()
    assert first.returncode == 0, first.stderr
    assert "demo day 0 (2025-12-31)" in first.stdout and "stats_events" in first.stdout
    second = run()
    assert second.returncode == 2
    assert "--advance-day" in second.stderr and "--reset" in second.stderr and "--if-missing" in second.stderr
    kept = run("--if-missing")
    assert kept.returncode == 0 and "already exists" in kept.stdout
    advanced = subprocess.run(
        [*args[:-2], "--advance-day"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert advanced.returncode == 0, advanced.stderr
    assert "demo day 1 (2026-01-01)" in advanced.stdout
    assert (tmp_path / "bucket" / "exports" / "partner_reports" / "partner_report_2026-01-01.parquet").exists()
