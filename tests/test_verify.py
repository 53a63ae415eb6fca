"""Reconciliation with the source on DuckDB and PostgreSQL: drift is created behind dlt's back, then located.

Each test loads the demo source (small scale) with the real pipelines, changes the warehouse or the source without
going through dlt (a deleted row, a changed value, a duplicate, a row changed in the source without its cursor),
and checks that verify names the table, the keys and the key range, and the command that repairs it.
"""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import pytest

from datamart import demo
from datamart.ingest.declarations import load_declaration, load_named
from datamart.ingest.repair import repair_pipeline
from datamart.ingest.runner import run_pipeline
from datamart.ingest.verify import full_compare, verify_pipeline
from datamart.settings import Warehouse
from datamart.testing.commands import dlt, environment
from datamart.testing.sources import Source

CHUNK = 20


@pytest.fixture
def loaded(warehouse: Warehouse, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Source:
    """The demo source (SQLite, scale 0.05) and bucket, both pipelines run once into the warehouse."""
    source = Source(f"sqlite:///{tmp_path / 'app.sqlite'}")
    demo.generate(source_url=source.url, bucket=tmp_path / "bucket", scale=0.05)
    monkeypatch.setenv("SOURCES__APP_DB__CREDENTIALS", source.url)
    monkeypatch.setenv("SOURCES__BUCKET__BUCKET_URL", str(tmp_path / "bucket"))
    monkeypatch.setenv("DATAMART__PII_HMAC_KEY", "verify-test-key")
    monkeypatch.setenv("DATAMART_PIPELINES_DIR", str(tmp_path / "pipelines"))
    for name in ("app_db", "bucket"):
        run_pipeline(load_named(name), warehouse)
    return source


def _source_rows(source: Source, statement: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(source.url[len("sqlite:///") :]) as conn:
        return conn.execute(statement).fetchall()


def test_a_fresh_load_has_no_drift_and_is_read_in_keyed_chunks(warehouse: Warehouse, loaded: Source) -> None:
    report = verify_pipeline(load_named("app_db"), warehouse, chunk_size=CHUNK)
    assert not report.drift, report.format()
    checks = {t.table: t for t in report.tables}
    live_missions = _source_rows(loaded, "SELECT count(*) FROM missions WHERE deleted_at IS NULL")[0][0]
    assert (checks["missions"].source_rows, checks["missions"].warehouse_rows) == (live_missions, live_missions)
    events = _source_rows(loaded, "SELECT count(*) FROM stats_events")[0][0]
    assert checks["stats_events"].source_rows == events
    assert checks["stats_events"].chunks == math.floor(events / CHUNK) + 1  # bounded keyset reads, the last short
    # personal columns are never compared; the others are
    assert "email" not in checks["volunteers"].columns and "department" in checks["volunteers"].columns
    assert "deleted_at" not in checks["missions"].columns and "title" in checks["missions"].columns
    assert report.format().splitlines()[-1].startswith("app_db: no drift")
    assert not verify_pipeline(load_named("bucket"), warehouse, chunk_size=CHUNK).drift


def test_drift_behind_dlts_back_is_located_by_key_and_range(warehouse: Warehouse, loaded: Source) -> None:
    decl = load_named("app_db")
    missions = [i for (i,) in _source_rows(loaded, "SELECT id FROM missions WHERE deleted_at IS NULL ORDER BY id")]
    gone, edited = missions[3], missions[-2]
    warehouse.query(f"DELETE FROM raw_app_db.missions WHERE id = {gone}")  # lost in the warehouse
    loaded.execute(f"UPDATE missions SET title = 'Changed without its cursor' WHERE id = {edited}")  # cursor missed it
    warehouse.query("INSERT INTO raw_app_db.stats_events SELECT * FROM raw_app_db.stats_events WHERE id = 7")
    warehouse.query("UPDATE raw_app_db.volunteers SET email = 'not-a-pseudonym' WHERE id = 1")  # personal: ignored
    # A change the next run will load (cursor beyond the warehouse's): pending, not drift.
    loaded.execute("UPDATE applications SET status = 'refused', updated_at = '2099-01-01 00:00:00' WHERE id = 3")

    report = verify_pipeline(decl, warehouse, chunk_size=CHUNK)
    checks = {t.table: t for t in report.tables}
    text = report.format()
    assert report.drift
    assert [t.table for t in report.tables if t.drift] == ["missions", "stats_events"], text
    m = checks["missions"]
    assert (m.missing, m.extra, m.changed) == (1, 0, 1)
    assert (m.missing_examples, m.changed_examples) == ([str(gone)], [str(edited)])
    # located: one drifted key range per affected chunk, each containing its key
    assert len(m.ranges) == 2
    assert int(m.ranges[0].first) <= gone <= int(m.ranges[0].last) and m.ranges[0].missing == 1
    assert int(m.ranges[1].first) <= edited <= int(m.ranges[1].last) and m.ranges[1].changed == 1
    assert m.ranges[0].source_checksum != m.ranges[0].warehouse_checksum
    assert checks["stats_events"].extra_examples == ["7 (twice)"]
    assert checks["applications"].pending == 1 and not checks["applications"].drift
    assert not checks["volunteers"].drift
    assert (
        "DRIFT in pipeline app_db, table missions: fix with `dlt pipeline app_db verify --repair --table missions`"
        in text
    )
    assert "raw_app_db.missions: columns that differ: title (1 rows)" in text
    assert f"raw_app_db.missions: 1 key(s) missing from the warehouse, e.g. {gone}" in text

    # The fix it names repairs it (the key twice is merged back to one row); the pending change is loaded by the run.
    assert not repair_pipeline(decl, warehouse, tables=["missions", "stats_events"], chunk_size=CHUNK).drift
    run_pipeline(decl, warehouse, tables=["applications"])
    again = verify_pipeline(decl, warehouse, chunk_size=CHUNK)
    assert not again.drift, again.format()
    assert {t.table: t.pending for t in again.tables}["applications"] == 0


def test_file_tables_compare_the_rows_of_the_current_files(warehouse: Warehouse, loaded: Source) -> None:
    decl = load_named("bucket")
    first = warehouse.query("SELECT report_date, partner_id FROM raw_bucket.partner_reports ORDER BY 1, 2 LIMIT 1")[0]
    warehouse.query(
        f"DELETE FROM raw_bucket.partner_reports WHERE report_date = '{first[0]}' AND partner_id = {first[1]}"
    )
    warehouse.query("UPDATE raw_bucket.partners SET name = 'Renamed behind dlt' WHERE partner_id = 2")
    report = verify_pipeline(decl, warehouse, chunk_size=CHUNK)
    checks = {t.table: t for t in report.tables}
    assert checks["partner_reports"].missing_examples == [f"({first[0].isoformat()}, {first[1]})"]
    assert checks["partners"].changed_examples == ["2"]
    assert "fix with `dlt pipeline bucket run --table partners --full-refresh`" in report.format()


def test_full_compare_reloads_into_a_scratch_dataset_and_drops_it(warehouse: Warehouse, loaded: Source) -> None:
    decl = load_named("app_db")
    warehouse.query("UPDATE raw_app_db.volunteers SET email = 'not-a-pseudonym' WHERE id = 2")
    report = full_compare(decl, warehouse, "volunteers", chunk_size=CHUNK)
    check = report.tables[0]
    assert report.drift and check.changed_examples == ["2"], report.format()  # pseudonyms are compared here
    assert not warehouse.table_exists("raw_app_db_verify", "volunteers")
    assert warehouse.query(
        "SELECT count(*) FROM information_schema.schemata WHERE schema_name LIKE 'raw_app_db_verify%'"
    ) == [(0,)]
    assert not full_compare(decl, warehouse, "missions", chunk_size=CHUNK).drift


@pytest.mark.postgres
def test_a_postgresql_source_with_text_keys_across_chunks(
    pg_database_factory: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = Source(pg_database_factory("source"))  # type: ignore[operator]
    source.execute("CREATE TABLE codes (code TEXT PRIMARY KEY, label TEXT, updated_at TIMESTAMP)")
    codes = ["a", "B", "b", "Z", "é", "ab", "a b", "Ä", "0", "_x"]
    source.execute("INSERT INTO codes VALUES (?, ?, '2026-01-01 00:00:00')", rows=[(c, c.upper()) for c in codes])
    declaration = tmp_path / "codes_db.yaml"
    declaration.write_text(
        "name: codes_db\nsource: {kind: sql_database}\ndataset: raw_codes\n"
        "tables:\n  codes: {write_disposition: merge, primary_key: code, cursor: updated_at}\n"
    )
    monkeypatch.setenv("SOURCES__CODES_DB__CREDENTIALS", source.url)
    warehouse = Warehouse(target="duckdb", duckdb_path=tmp_path / "wh.duckdb")
    decl = load_declaration(declaration)
    run_pipeline(decl, warehouse, pipelines_dir=tmp_path / "p")
    report = verify_pipeline(decl, warehouse, chunk_size=3)
    assert not report.drift, report.format()
    assert report.tables[0].chunks == 4
    warehouse.query("UPDATE raw_codes.codes SET label = 'x' WHERE code = 'é'")
    assert verify_pipeline(decl, warehouse, chunk_size=3).tables[0].changed_examples == ["é"]


def test_cli_exits_1_on_drift_naming_pipeline_table_and_fix(
    warehouse: Warehouse, loaded: Source, tmp_path: Path
) -> None:
    env = environment(("DESTINATION__",), **warehouse.environment_variables())
    ok = dlt(env, "pipeline", "all", "verify")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "app_db: no drift" in ok.stdout and "bucket: no drift" in ok.stdout

    warehouse.query("DELETE FROM raw_app_db.applications WHERE id = 5")
    drift = dlt(env, "pipeline", "app_db", "verify", "--table", "applications")
    assert drift.returncode == 1
    assert "raw_app_db.applications: 1 key(s) missing from the warehouse, e.g. 5" in drift.stdout
    assert "fix with `dlt pipeline app_db verify --repair --table applications`" in drift.stdout
