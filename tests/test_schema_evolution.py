"""Schema evolution: new source columns arrive by themselves, type changes are applied (or follow a declared
contract), nothing wedges."""

from __future__ import annotations

import re
from pathlib import Path

import psycopg2
import pytest

from datamart.ingest.declarations import PipelineDecl, load_declaration
from datamart.ingest.runner import format_loads, make_pipeline, run_pipeline
from datamart.settings import Warehouse
from datamart.testing.sources import Source


def declaration(tmp_path: Path, contract: str = "") -> PipelineDecl:
    """A one-table pipeline `shop` reading `missions` from the test's source."""
    directory = tmp_path / "declarations"
    directory.mkdir(exist_ok=True)
    path = directory / "shop.yaml"
    path.write_text(
        "name: shop\nsource: {kind: sql_database}\ndataset: raw_shop\ntables:\n"
        f"  missions: {{write_disposition: merge, primary_key: id, cursor: updated_at{contract}}}\n"
    )
    return load_declaration(path)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def source(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Source:
    """A `missions` table in SQLite, then in PostgreSQL, wired as the `shop` pipeline's connection."""
    if request.param == "sqlite":
        src = Source(f"sqlite:///{tmp_path / 'shop.sqlite'}")
    else:
        src = Source(request.getfixturevalue("pg_database_factory")("source"))
    src.execute(
        "CREATE TABLE missions (id INTEGER PRIMARY KEY, places INTEGER NOT NULL, updated_at TIMESTAMP NOT NULL)",
        "INSERT INTO missions VALUES (1, 5, '2025-01-01 00:00:00'), (2, 6, '2025-01-02 00:00:00')",
    )
    monkeypatch.setenv("SOURCES__SHOP__CREDENTIALS", src.url)
    return src


def retype_places_to_text(source: Source) -> None:
    """The application changes `places` from a number to text, and one row now says 'N/A'."""
    if source.is_sqlite:  # SQLite cannot alter a column's type: rebuild the table
        source.execute(
            "ALTER TABLE missions RENAME TO old",
            "CREATE TABLE missions (id INTEGER PRIMARY KEY, places TEXT NOT NULL, updated_at TIMESTAMP NOT NULL)",
            "INSERT INTO missions SELECT * FROM old",
            "DROP TABLE old",
        )
    else:
        source.execute("ALTER TABLE missions ALTER COLUMN places TYPE text")
    source.execute("UPDATE missions SET places = 'N/A', updated_at = '2025-02-01 00:00:00' WHERE id = 2")


def test_a_new_source_column_arrives_and_the_summary_names_it(
    warehouse: Warehouse, source: Source, tmp_path: Path
) -> None:
    decl = declaration(tmp_path)
    run_pipeline(decl, warehouse, pipelines_dir=tmp_path / "p")
    source.execute(
        "ALTER TABLE missions ADD COLUMN city TEXT",
        "UPDATE missions SET city = 'Lyon', updated_at = '2025-03-01 00:00:00' WHERE id = 1",
    )
    run = run_pipeline(decl, warehouse, pipelines_dir=tmp_path / "p")
    assert run.tables[0].new_columns == ("city",)
    # the table is reloaded: a row the cursor did not read again gets the source's value too (here NULL)
    assert "raw_shop.missions: column city added, table reloaded (2 rows, " in format_loads([run])
    assert warehouse.query("SELECT id, city FROM raw_shop.missions ORDER BY id") == [(1, "Lyon"), (2, None)]


def test_a_type_change_is_applied_by_reloading_the_table(warehouse: Warehouse, source: Source, tmp_path: Path) -> None:
    decl = declaration(tmp_path)
    run_pipeline(decl, warehouse, pipelines_dir=tmp_path / "p")
    retype_places_to_text(source)
    run = run_pipeline(decl, warehouse, pipelines_dir=tmp_path / "p")  # no error: the change is applied
    assert re.search(
        r"raw_shop\.missions: column places retyped bigint → (text|varchar), table reloaded \(2 rows, ",
        format_loads([run]),
        re.IGNORECASE,  # DuckDB says BIGINT → VARCHAR
    )
    assert not make_pipeline(decl, warehouse, tmp_path / "p").has_pending_data
    assert warehouse.query("SELECT id, places FROM raw_shop.missions ORDER BY id") == [(1, "5"), (2, "N/A")]
    # the cursor continues from the rows reloaded: the next run reads only what changed after them
    source.execute("INSERT INTO missions VALUES (3, '7', '2025-03-01 00:00:00')")
    again = run_pipeline(decl, warehouse, pipelines_dir=tmp_path / "p")
    assert again.tables[0].rows_loaded == 1 and not again.tables[0].change
    assert warehouse.query("SELECT id, places FROM raw_shop.missions ORDER BY id") == [(1, "5"), (2, "N/A"), (3, "7")]


def test_a_type_change_evolves_into_a_variant_column_when_declared(
    warehouse: Warehouse, source: Source, tmp_path: Path
) -> None:
    decl = declaration(tmp_path, ", schema_contract: {data_type: evolve}")
    run_pipeline(decl, warehouse, pipelines_dir=tmp_path / "p")
    retype_places_to_text(source)
    run = run_pipeline(decl, warehouse, pipelines_dir=tmp_path / "p")
    assert run.tables[0].new_columns == ("places__v_text",)
    assert warehouse.query("SELECT id, places, places__v_text FROM raw_shop.missions ORDER BY id") == [
        (1, 5, None),
        (2, None, "N/A"),
    ]


@pytest.mark.postgres
def test_a_load_the_warehouse_refuses_is_discarded_and_reread_after_the_fix(
    pg_database_factory: object, source: Source, tmp_path: Path
) -> None:
    from datamart.settings import postgres_warehouse

    url = pg_database_factory("warehouse")  # type: ignore[operator]
    warehouse = postgres_warehouse(url)
    decl = declaration(tmp_path)
    run_pipeline(decl, warehouse, pipelines_dir=tmp_path / "p")
    with psycopg2.connect(url) as conn, conn.cursor() as cur:  # a rule the warehouse enforces
        cur.execute("ALTER TABLE raw_shop.missions ADD CONSTRAINT places_positive CHECK (places >= 0)")
    source.execute("UPDATE missions SET places = -1, updated_at = '2025-02-01 00:00:00' WHERE id = 2")
    with pytest.raises(Exception, match="places_positive"):
        run_pipeline(decl, warehouse, pipelines_dir=tmp_path / "p")
    assert make_pipeline(decl, warehouse, tmp_path / "p").has_pending_data  # dlt keeps the failed package

    # Fixed in the source: the next run discards the failed package and reads the row again.
    source.execute("UPDATE missions SET places = 1, updated_at = '2025-02-02 00:00:00' WHERE id = 2")
    source.execute("INSERT INTO missions VALUES (3, 7, '2025-02-03 00:00:00')")
    run = run_pipeline(decl, warehouse, pipelines_dir=tmp_path / "p")
    assert run.tables[0].rows_loaded == 2
    assert warehouse.query("SELECT id, places FROM raw_shop.missions ORDER BY id") == [(1, 5), (2, 1), (3, 7)]
    assert not make_pipeline(decl, warehouse, tmp_path / "p").has_pending_data


def test_rows_committed_late_inside_the_lag_window_are_not_lost_nor_doubled(
    warehouse: Warehouse, source: Source, tmp_path: Path
) -> None:
    decl = declaration(tmp_path, ", lag: 3600")
    run_pipeline(decl, warehouse, pipelines_dir=tmp_path / "p")  # last updated_at seen: 2025-01-02 00:00:00
    # A transaction that started earlier commits now: its updated_at is 30 minutes BEFORE the last value seen.
    source.execute("INSERT INTO missions VALUES (3, 9, '2025-01-01 23:30:00')")
    run = run_pipeline(decl, warehouse, pipelines_dir=tmp_path / "p")
    assert run.tables[0].rows_loaded >= 1
    assert warehouse.query("SELECT id, places FROM raw_shop.missions ORDER BY id") == [(1, 5), (2, 6), (3, 9)]
    # Outside the window it would be lost: that is what the lag is declared for.
    source.execute("INSERT INTO missions VALUES (4, 1, '2024-12-01 00:00:00')")
    run_pipeline(decl, warehouse, pipelines_dir=tmp_path / "p")
    assert warehouse.query("SELECT count(*) FROM raw_shop.missions WHERE id = 4") == [(0,)]


def test_without_a_lag_the_late_row_is_lost(warehouse: Warehouse, source: Source, tmp_path: Path) -> None:
    decl = declaration(tmp_path)
    run_pipeline(decl, warehouse, pipelines_dir=tmp_path / "p")
    source.execute("INSERT INTO missions VALUES (3, 9, '2025-01-01 23:30:00')")
    run_pipeline(decl, warehouse, pipelines_dir=tmp_path / "p")
    assert warehouse.query("SELECT count(*) FROM raw_shop.missions WHERE id = 3") == [(0,)]
