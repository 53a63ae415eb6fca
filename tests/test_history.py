"""History tables (``history: scd2``): every version of a row kept with its validity dates, through the real
``dlt pipeline <name> run`` command, on real sources (SQLite, PostgreSQL) and warehouses (DuckDB, PostgreSQL)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from datamart.ingest.declarations import DeclarationError, load_declaration
from datamart.ingest.verify import verify_pipeline
from datamart.settings import PROJECT_ROOT, Warehouse
from datamart.testing.sources import Source


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def source(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Source:
    """An application database with one `items` table, whose status changes: SQLite, then PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'app.sqlite'}"
    else:
        url = request.getfixturevalue("pg_database_factory")("source")
    monkeypatch.setenv("SOURCES__APP__CREDENTIALS", url)  # verify, in this process
    src = Source(url)
    src.execute(
        "CREATE TABLE items (id BIGINT PRIMARY KEY, label TEXT, status TEXT, updated_at TIMESTAMP, "
        "deleted_at TIMESTAMP)"
    )
    return src


def declare(folder: Path, **table: object) -> Path:
    folder.mkdir(exist_ok=True)
    raw = {
        "name": "app",
        "source": {"kind": "sql_database"},
        "dataset": "raw_app",
        "tables": {
            "items": {
                "write_disposition": "merge",
                "primary_key": "id",
                "cursor": "updated_at",
                "history": "scd2",
                "deletes": {"soft": "deleted_at", "hard": "key_set"},
                **table,
            }
        },
    }
    path = folder / "app.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def run(
    source: Source, warehouse: Warehouse, tmp_path: Path, expect: int = 0, command: tuple[str, ...] = ("run",)
) -> dict[str, int]:
    """``dlt pipeline app run`` as a user types it; the counts its summary prints for raw_app.items (the error
    output under "error" when the run is expected to fail with ``expect``)."""
    env = dict(
        os.environ,
        DATAMART_DECLARATIONS_DIR=str(tmp_path / "declarations"),
        DATAMART_PIPELINES_DIR=str(tmp_path / "dlt"),
        SOURCES__APP__CREDENTIALS=source.url,
    )
    env.update(warehouse.environment_variables())
    dlt = Path(sys.executable).parent / "dlt"
    result = subprocess.run(
        [str(dlt), "pipeline", "app", *command],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == expect, result.stdout + result.stderr
    if expect or command != ("run",):
        return {"error": result.stderr, "output": result.stdout}  # type: ignore[dict-item]
    line = re.search(r"raw_app\.items\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)", result.stdout)
    assert line, result.stdout
    read, inserted, updated, deleted, total = (int(v.replace(",", "")) for v in line.groups())
    return {"read": read, "inserted": inserted, "updated": updated, "deleted": deleted, "in warehouse": total}


def versions(warehouse: Warehouse) -> dict[int, list[tuple[str, object, object]]]:
    """Per id, its versions (status, valid_from, valid_to) in validity order."""
    rows = warehouse.query(
        "SELECT id, status, _dlt_valid_from, _dlt_valid_to FROM raw_app.items ORDER BY id, _dlt_valid_from"
    )
    found: dict[int, list[tuple[str, object, object]]] = {}
    for key, status, valid_from, valid_to in rows:
        found.setdefault(int(key), []).append((status, valid_from, valid_to))
    return found


def current_rows(warehouse: Warehouse) -> list[tuple[object, ...]]:
    return [
        (int(r[0]), r[1], r[2])
        for r in warehouse.query(
            "SELECT id, label, status FROM raw_app.items WHERE _dlt_valid_to IS NULL AND deleted_at IS NULL ORDER BY id"
        )
    ]


def source_rows(source: Source) -> list[tuple[object, ...]]:
    import sqlalchemy as sa

    from datamart.ingest.sources import normalise_sqlalchemy_url

    engine = sa.create_engine(normalise_sqlalchemy_url(source.url))
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT id, label, status FROM items WHERE deleted_at IS NULL ORDER BY id")
            ).fetchall()
    finally:
        engine.dispose()
    return [(int(r[0]), r[1], r[2]) for r in rows]


def test_versions_with_contiguous_validity_and_deletes_retired(
    source: Source, warehouse: Warehouse, tmp_path: Path
) -> None:
    """A row updated twice across runs has three versions whose validity periods follow each other; an unchanged
    row keeps one version; a soft-deleted and a hard-deleted row have their current version retired (no current
    version left); the current versions equal the source row for row, and ``verify`` agrees."""
    declare(tmp_path / "declarations")
    rows = [(i, f"item {i}", "draft", "2025-01-01 10:00:00") for i in (1, 2, 3, 4)]
    source.execute("INSERT INTO items (id, label, status, updated_at) VALUES (?, ?, ?, ?)", rows=rows)
    first = run(source, warehouse, tmp_path)
    assert first == {"read": 4, "inserted": 4, "updated": 0, "deleted": 0, "in warehouse": 4}

    source.execute(
        "UPDATE items SET status = 'published', updated_at = '2025-01-02 10:00:00' WHERE id = 1",
        "UPDATE items SET deleted_at = '2025-01-02 11:00:00', updated_at = '2025-01-02 11:00:00' WHERE id = 3",
        "DELETE FROM items WHERE id = 4",
    )
    second = run(source, warehouse, tmp_path)
    # id 1 updated, id 3 soft-deleted, id 4 hard-deleted (key set)
    assert second == {"read": 2, "inserted": 0, "updated": 1, "deleted": 2, "in warehouse": 2}

    source.execute("UPDATE items SET status = 'closed', updated_at = '2025-01-03 10:00:00' WHERE id = 1")
    third = run(source, warehouse, tmp_path)
    assert third == {"read": 1, "inserted": 0, "updated": 1, "deleted": 0, "in warehouse": 2}

    before = versions(warehouse)
    quiet = run(source, warehouse, tmp_path)  # nothing changed: no version added or retired
    assert quiet["inserted"] == quiet["updated"] == quiet["deleted"] == 0
    found = versions(warehouse)
    assert found == before

    assert [s for s, _, _ in found[1]] == ["draft", "published", "closed"]
    periods = found[1]
    assert periods[0][2] == periods[1][1] and periods[1][2] == periods[2][1], periods  # contiguous
    assert periods[0][1] < periods[1][1] < periods[2][1] and periods[2][2] is None
    assert len(found[2]) == 1 and found[2][0][2] is None  # unchanged: one current version
    for deleted in (3, 4):
        assert len(found[deleted]) == 1 and found[deleted][0][2] is not None, found[deleted]  # retired

    assert current_rows(warehouse) == source_rows(source)
    report = verify_pipeline(load_declaration(tmp_path / "declarations" / "app.yaml"), warehouse)
    assert not report.drift, report.format()

    # a deleted key that comes back gets a new current version, after its retired one
    source.execute("INSERT INTO items (id, label, status, updated_at) VALUES (4, 'item 4', 'draft', '2025-01-04')")
    back = run(source, warehouse, tmp_path)
    assert back["in warehouse"] == 3
    assert [v[2] is None for v in versions(warehouse)[4]] == [False, True]
    assert current_rows(warehouse) == source_rows(source)

    # an update the cursor misses (updated_at not moved): `verify --repair` reads the key's range again, and the
    # changed row becomes a new version (the history is kept, never rewritten in place)
    source.execute("UPDATE items SET status = 'closed' WHERE id = 2")
    assert run(source, warehouse, tmp_path)["updated"] == 0
    run(source, warehouse, tmp_path, command=("verify", "--repair"))
    assert [s for s, _, _ in versions(warehouse)[2]] == ["draft", "closed"]
    assert current_rows(warehouse) == source_rows(source)
    assert versions(warehouse)[1] == found[1]  # the other keys' versions untouched


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"history": "scd"}, r"tables\.items\.history: 'scd' is not one of scd2 \(did you mean 'scd2'\?\)"),
        (
            {"write_disposition": "append", "deletes": {}, "cursor": "id"},
            r"tables\.items\.history: history keeps the versions of each key: it needs write_disposition: merge "
            "and a primary_key",
        ),
        ({"histroy": "scd2"}, r"tables\.items\.histroy: unknown key \(did you mean 'history'\?\)"),
        (
            {"personal": {"label": "hash", "status": "keep"}},
            r"tables\.items\.history: the table has personal columns \(label\): history keeps every past version",
        ),
    ],
)
def test_a_wrong_history_declaration_is_refused(tmp_path: Path, table: dict[str, object], message: str) -> None:
    with pytest.raises(DeclarationError, match=message):
        load_declaration(declare(tmp_path / "declarations", **table))


def test_history_on_a_table_loaded_without_it_is_refused(source: Source, warehouse: Warehouse, tmp_path: Path) -> None:
    """A table loaded as a plain merge, then declared ``history: scd2``: its rows have no validity, dlt's scd2 would
    leave each beside a second current version; the run stops before reading, saying how to start the history."""
    path = declare(tmp_path / "declarations")
    plain = yaml.safe_load(path.read_text())
    del plain["tables"]["items"]["history"]
    path.write_text(yaml.safe_dump(plain, sort_keys=False))
    source.execute("INSERT INTO items (id, label, status, updated_at) VALUES (1, 'item 1', 'draft', '2025-01-01')")
    run(source, warehouse, tmp_path)
    declare(tmp_path / "declarations")
    refused = run(source, warehouse, tmp_path, expect=2)
    assert (
        "app.yaml: tables.items.history: raw_app.items was loaded without history (its rows have no validity "
        "dates); drop the table and its state (`dlt pipeline app drop items`"
    ) in refused["error"], refused


def test_an_incremental_load_retires_only_the_keys_it_read(
    source: Source, warehouse: Warehouse, tmp_path: Path
) -> None:
    """Without deletes the key is dlt's merge_key: a run that reads one changed row leaves every other key's current
    version current (scd2 without it would retire every key absent from the load)."""
    declare(tmp_path / "declarations", deletes={})
    rows = [(i, f"item {i}", "draft", "2025-01-01 10:00:00") for i in (1, 2, 3)]
    source.execute("INSERT INTO items (id, label, status, updated_at) VALUES (?, ?, ?, ?)", rows=rows)
    run(source, warehouse, tmp_path)
    source.execute("UPDATE items SET status = 'published', updated_at = '2025-01-02 10:00:00' WHERE id = 2")
    second = run(source, warehouse, tmp_path)
    assert second == {"read": 1, "inserted": 0, "updated": 1, "deleted": 0, "in warehouse": 3}
    found = versions(warehouse)
    assert [(s, to is None) for s, _, to in found[2]] == [("draft", False), ("published", True)]
    assert all(len(found[k]) == 1 and found[k][0][2] is None for k in (1, 3)), found
    assert current_rows(warehouse) == source_rows(source)


@pytest.mark.postgres
def test_load_sessions_can_hash_the_current_versions(pg_database: str, tmp_path: Path) -> None:
    """dlt's merge of a history table inserts the staged rows whose version is `NOT IN` the current ones: PostgreSQL
    hashes those only within work_mem, else rescans them per staged row (143.7 s instead of about 1 s on the bench's
    475,000 missions). The load sessions get LOAD_WORK_MEM; a work_mem the warehouse URL sets is kept."""
    import dlt

    from datamart.settings import LOAD_WORK_MEM, postgres_warehouse

    def session_work_mem(url: str) -> str:
        destination = postgres_warehouse(url).dlt_destination()
        pipeline = dlt.pipeline("probe", destination=destination, dataset_name="probe", pipelines_dir=str(tmp_path))
        with pipeline.sql_client() as sql:
            return sql.execute_sql("SHOW work_mem")[0][0]

    assert session_work_mem(pg_database) == LOAD_WORK_MEM
    assert session_work_mem(f"{pg_database}?options=-cwork_mem%3D8MB") == "8MB"
