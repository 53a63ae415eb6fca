"""Hard deletes by key sets: integer keys compared by buckets first, only the differing buckets' keys read.

Real sources (SQLite, PostgreSQL) and real warehouses (DuckDB, PostgreSQL); the only thing observed from inside is
which buckets' keys the source was asked for, to prove the others were not read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from datamart.ingest import deletes
from datamart.ingest.declarations import PipelineDecl, load_declaration
from datamart.ingest.runner import run_pipeline
from datamart.settings import Warehouse
from datamart.testing.sources import Source

WIDTH = deletes.MIN_BUCKET_WIDTH  # the buckets of a small table


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def source(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Source:
    """An empty application database wired as the `app` pipeline's source: SQLite, then PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'app.sqlite'}"
    else:
        url = request.getfixturevalue("pg_database_factory")("source")
    monkeypatch.setenv("SOURCES__APP__CREDENTIALS", url)
    src = Source(url)
    src.execute("CREATE TABLE items (id BIGINT PRIMARY KEY, label TEXT, updated_at TIMESTAMP)")
    return src


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[list[int] | None]:
    """The bucket filters the source's keys were read with, one entry per read (None: every key)."""
    seen: list[list[int] | None] = []
    read = deletes._source_keys

    def recording(url: str, schema: str | None, table: Any, only: list[int] | None = None, width: int = 0) -> Any:
        seen.append(only)
        return read(url, schema, table, only, width)

    monkeypatch.setattr(deletes, "_source_keys", recording)
    return seen


def declare(tmp_path: Path) -> PipelineDecl:
    folder = tmp_path / "declarations"
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
                "deletes": {"hard": "key_set"},
            }
        },
    }
    (folder / "app.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return load_declaration(folder / "app.yaml")


def insert(source: Source, ids: list[int], when: str = "2025-01-01 10:00:00") -> None:
    source.execute(f"INSERT INTO items VALUES (?, ?, '{when}')", rows=[(i, f"item {i}") for i in ids])


def run(source: Source, warehouse: Warehouse, tmp_path: Path) -> int:
    """One run of the `app` pipeline; the number of deleted rows it reports."""
    result = run_pipeline(declare(tmp_path), warehouse, pipelines_dir=tmp_path / "dlt")
    return result.tables[0].rows_deleted


def loaded(warehouse: Warehouse) -> set[int]:
    return {int(r[0]) for r in warehouse.query("SELECT id FROM raw_app.items")}


def test_only_the_buckets_with_deletions_are_read(
    source: Source, warehouse: Warehouse, tmp_path: Path, reads: list[list[int] | None]
) -> None:
    ids = list(range(1, 5 * WIDTH))  # five buckets
    insert(source, ids)
    run(source, warehouse, tmp_path)
    assert reads == []  # first load: nothing to compare

    gone = {WIDTH + 10, WIDTH + 11, 4 * WIDTH + 7}
    source.execute(*(f"DELETE FROM items WHERE id = {i}" for i in gone))
    insert(source, [5 * WIDTH + 1], when="2025-02-01 10:00:00")  # a new row in a new bucket, loaded by the cursor
    assert run(source, warehouse, tmp_path) == 3
    assert reads == [[WIDTH, 4 * WIDTH]]  # the other buckets' keys were not read
    assert loaded(warehouse) == (set(ids) - gone) | {5 * WIDTH + 1}

    reads.clear()
    assert run(source, warehouse, tmp_path) == 0
    assert reads == []  # every bucket agrees: no key read at all


def test_a_swap_with_the_same_count_and_sum_is_still_found(
    source: Source, warehouse: Warehouse, tmp_path: Path, reads: list[list[int] | None]
) -> None:
    assert WIDTH == 64
    insert(source, list(range(2, 3 * WIDTH, 2)))  # even keys
    run(source, warehouse, tmp_path)
    # 70 and 120 deleted; 91 and 99 appear with an old cursor value (the cursor never loads them): the bucket's
    # count (2) and sum (190) are unchanged, only the sum of squares tells the difference.
    source.execute("DELETE FROM items WHERE id IN (70, 120)")
    insert(source, [91, 99], when="2024-01-01 10:00:00")
    assert run(source, warehouse, tmp_path) == 2
    assert reads == [[64]]
    assert {70, 120}.isdisjoint(loaded(warehouse))


def test_negative_keys_and_deletions_everywhere_compare_every_key(
    source: Source, warehouse: Warehouse, tmp_path: Path, reads: list[list[int] | None]
) -> None:
    insert(source, list(range(-5, 3 * WIDTH)))
    run(source, warehouse, tmp_path)
    source.execute("DELETE FROM items WHERE id = -3")
    assert run(source, warehouse, tmp_path) == 1
    assert reads == [None]  # buckets would straddle zero: every key compared

    source.execute("DELETE FROM items WHERE id < 0")
    run(source, warehouse, tmp_path)
    reads.clear()
    source.execute(*(f"DELETE FROM items WHERE id = {b * WIDTH + 5}" for b in range(3)))  # in every bucket
    assert run(source, warehouse, tmp_path) == 3
    assert reads == [None]  # most buckets differ: reading every key costs less than filtering
    assert len(loaded(warehouse)) == 3 * WIDTH - 3


def test_buckets_widen_with_the_table_so_their_summaries_stay_small() -> None:
    assert [deletes.bucket_width(n) for n in (0, 2_000_000, 10_000_000, 100_000_000)] == [64, 64, 512, 4096]
    assert deletes.bucket_width(None) == 4096


def test_deleted_rows_are_recorded_with_their_key_and_references(
    warehouse: Warehouse, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A withdrawn application leaves its id and its mission (what a mission's counts need) in ops.deleted_rows, a
    soft- or hard-deleted mission its id; an erased volunteer leaves nothing, nor do its applications' volunteer ids."""
    url = f"sqlite:///{tmp_path / 'app.sqlite'}"
    monkeypatch.setenv("SOURCES__SHOP__CREDENTIALS", url)
    monkeypatch.setenv("DATAMART__PII_HMAC_KEY", "tombstone-test-key")
    src = Source(url)
    src.execute(
        "CREATE TABLE missions (id BIGINT PRIMARY KEY, title TEXT, updated_at TIMESTAMP, deleted_at TIMESTAMP)",
        "CREATE TABLE volunteers (id BIGINT PRIMARY KEY, email TEXT, updated_at TIMESTAMP)",
        "CREATE TABLE applications (id BIGINT PRIMARY KEY, mission_id BIGINT, volunteer_id BIGINT, "
        "updated_at TIMESTAMP)",
    )
    when = "2025-01-01 10:00:00"
    src.execute(f"INSERT INTO missions VALUES (?, ?, '{when}', NULL)", rows=[(m, f"mission {m}") for m in range(1, 6)])
    src.execute(f"INSERT INTO volunteers VALUES (?, ?, '{when}')", rows=[(v, f"v{v}@example.org") for v in (1, 2)])
    applications = {a: (a % 5 + 1, a % 2 + 1) for a in range(1, 21)}  # id → (mission, volunteer)
    src.execute(
        f"INSERT INTO applications VALUES (?, ?, ?, '{when}')",
        rows=[(a, m, v) for a, (m, v) in applications.items()],
    )
    folder = tmp_path / "declarations"
    folder.mkdir()
    table = {"write_disposition": "merge", "primary_key": "id", "cursor": "updated_at", "deletes": {"hard": "key_set"}}
    raw = {
        "name": "shop",
        "source": {"kind": "sql_database"},
        "dataset": "raw_shop",
        "tables": {
            "missions": {**table, "deletes": {"soft": "deleted_at", "hard": "key_set"}},
            "volunteers": {**table, "personal": {"email": "hash"}},
            "applications": table,
        },
    }
    (folder / "shop.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    decl = load_declaration(folder / "shop.yaml")
    run_pipeline(decl, warehouse, pipelines_dir=tmp_path / "dlt")
    assert warehouse.query("SELECT count(*) FROM ops.deleted_rows")[0][0] == 0  # nothing deleted yet

    withdrawn = [3, 4, 17]
    src.execute(*(f"DELETE FROM applications WHERE id = {a}" for a in withdrawn), "DELETE FROM missions WHERE id = 2")
    src.execute("DELETE FROM volunteers WHERE id = 2")  # an erasure: no trace of the person's key in ops
    later = "2025-01-02 10:00:00"
    src.execute(f"UPDATE missions SET deleted_at = '{later}', updated_at = '{later}' WHERE id = 3")  # soft delete
    result = run_pipeline(decl, warehouse, pipelines_dir=tmp_path / "dlt")
    deleted = {t.table: t.rows_deleted for t in result.tables}
    assert (deleted["volunteers"], deleted["applications"]) == (1, 3)

    rows = warehouse.query(
        "SELECT table_name, row_key, referenced_table, referenced_key, deleted_at FROM ops.deleted_rows"
    )
    assert all(at is not None for *_, at in rows)
    assert sorted(r[:4] for r in rows) == sorted(
        [("applications", str(a), "missions", str(applications[a][0])) for a in withdrawn]
        + [("missions", "2", None, None), ("missions", "3", None, None)]
    )  # nothing of volunteer 2, nor the volunteers of the withdrawn applications

    run_pipeline(decl, warehouse, pipelines_dir=tmp_path / "dlt")  # nothing deleted: nothing recorded
    assert warehouse.query("SELECT count(*) FROM ops.deleted_rows")[0][0] == 5
