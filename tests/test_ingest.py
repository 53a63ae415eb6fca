"""Declared pipelines load into real warehouses: incremental merges, personal data treated, declarations checked."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

import pytest

from datamart.ingest.declarations import DeclarationError, load_declaration, load_named
from datamart.ingest.runner import format_loads, run_pipeline
from datamart.settings import DEMO_PIPELINES_DIR, PROJECT_ROOT, SettingsError, Warehouse
from datamart.testing.commands import dlt
from datamart.testing.sources import Source

KEY = "test-pseudonymisation-key"
VOLUNTEERS = [
    # id, email, first_name, last_name, phone, birth_date, postcode, department, created_at, updated_at
    (1, "lea.martin3@example.org", "Léa", "Martin", "0611223344", "1990-05-01", "75011", "75",
     "2025-10-01 10:00:00", "2025-10-01 10:00:00"),
    (2, "hugo.bernard7@example.org", "Hugo", "Bernard", "0655667788", "1985-12-31", "13001", "13",
     "2025-10-02 11:00:00", "2025-10-02 11:00:00"),
    (3, "chloe.petit1@example.org", "Chloé", "Petit", "0699887766", "2001-01-15", "48000", "48",
     "2025-10-03 12:00:00", "2025-10-03 12:00:00"),
]  # fmt: skip


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def app_source(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Source:
    """A small application database with personal data, wired as the app_db source: SQLite, then PostgreSQL."""
    if request.param == "sqlite":
        source = Source(f"sqlite:///{tmp_path / 'app.sqlite'}")
    else:
        source = Source(request.getfixturevalue("pg_database_factory")("source"))
    source.execute(
        "CREATE TABLE volunteers (id INTEGER PRIMARY KEY, email TEXT NOT NULL, first_name TEXT, last_name TEXT, "
        "phone TEXT, birth_date DATE, postcode TEXT, department TEXT, created_at TIMESTAMP, updated_at TIMESTAMP)"
    )
    source.execute("INSERT INTO volunteers VALUES (?,?,?,?,?,?,?,?,?,?)", rows=VOLUNTEERS)
    monkeypatch.setenv("SOURCES__APP_DB__CREDENTIALS", source.url)
    monkeypatch.setenv("DATAMART__PII_HMAC_KEY", KEY)
    return source


def _load(warehouse: Warehouse, tmp_path: Path) -> dict[str, int]:
    run = run_pipeline(load_named("app_db"), warehouse, tables=["volunteers"], pipelines_dir=tmp_path / "pipelines")
    return {t.table: t.rows_loaded for t in run.tables}


def test_personal_columns_never_reach_the_warehouse_in_clear(
    warehouse: Warehouse, app_source: Source, tmp_path: Path
) -> None:
    assert _load(warehouse, tmp_path) == {"volunteers": 3}

    columns = [
        r[0]
        for r in warehouse.query(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = 'raw_app_db' AND table_name = 'volunteers' ORDER BY ordinal_position"
        )
    ]
    assert columns == ["id", "email", "department", "created_at", "updated_at", "birth_year", "_dlt_load_id"]
    rows = warehouse.query("SELECT id, email, birth_year FROM raw_app_db.volunteers ORDER BY id")
    expected = [
        (v[0], hmac.new(KEY.encode(), v[1].encode(), hashlib.sha256).hexdigest(), int(v[5][:4])) for v in VOLUNTEERS
    ]
    assert rows == expected
    # No clear personal value anywhere in the loaded table, whatever the column.
    dump = " ".join(str(value) for row in warehouse.query("SELECT * FROM raw_app_db.volunteers") for value in row)
    for volunteer in VOLUNTEERS:
        for clear in (volunteer[1], volunteer[2], volunteer[3], volunteer[4], volunteer[5], volunteer[6]):
            assert clear not in dump


def test_second_run_loads_only_what_changed(warehouse: Warehouse, app_source: Source, tmp_path: Path) -> None:
    assert _load(warehouse, tmp_path) == {"volunteers": 3}
    assert _load(warehouse, tmp_path) == {"volunteers": 0}

    app_source.execute("UPDATE volunteers SET department = '69', updated_at = '2026-01-01 09:00:00' WHERE id = 2")
    app_source.execute(
        "INSERT INTO volunteers VALUES (4, 'new@example.org', 'N', 'E', '0600000000', '1970-07-07', '69001', "
        "'69', '2026-01-01 10:00:00', '2026-01-01 10:00:00')"
    )
    run = run_pipeline(load_named("app_db"), warehouse, tables=["volunteers"], pipelines_dir=tmp_path / "pipelines")
    assert (run.tables[0].rows_loaded, run.tables[0].inserted, run.tables[0].updated) == (2, 1, 1)
    assert warehouse.query("SELECT id, department FROM raw_app_db.volunteers ORDER BY id") == [
        (1, "75"),
        (2, "69"),
        (3, "48"),
        (4, "69"),
    ]


def test_hard_deletes_are_found_by_comparing_key_sets(warehouse: Warehouse, app_source: Source, tmp_path: Path) -> None:
    decl = load_named("app_db")
    assert decl.table("volunteers").deletes == {"hard": "key_set"}
    _load(warehouse, tmp_path)
    app_source.execute("DELETE FROM volunteers WHERE id = 2")  # a right-to-erasure request
    run = run_pipeline(decl, warehouse, tables=["volunteers"], pipelines_dir=tmp_path / "pipelines")
    assert (run.tables[0].rows_loaded, run.tables[0].rows_deleted, run.tables[0].rows_in_warehouse) == (0, 1, 2)
    assert warehouse.query("SELECT id FROM raw_app_db.volunteers ORDER BY id") == [(1,), (3,)]
    pseudonym = hmac.new(KEY.encode(), VOLUNTEERS[1][1].encode(), hashlib.sha256).hexdigest()
    assert warehouse.query(f"SELECT count(*) FROM raw_app_db.volunteers WHERE email = '{pseudonym}'") == [(0,)]
    again = run_pipeline(decl, warehouse, tables=["volunteers"], pipelines_dir=tmp_path / "pipelines")
    assert (again.tables[0].rows_loaded, again.tables[0].rows_deleted) == (0, 0)


def test_a_new_column_in_a_table_with_personal_data_waits_for_its_classification(
    warehouse: Warehouse, app_source: Source, tmp_path: Path
) -> None:
    _load(warehouse, tmp_path)
    app_source.execute("ALTER TABLE volunteers ADD COLUMN nickname TEXT")
    app_source.execute("UPDATE volunteers SET nickname = 'Lele', updated_at = '2026-01-02 00:00:00' WHERE id = 1")
    run = run_pipeline(load_named("app_db"), warehouse, tables=["volunteers"], pipelines_dir=tmp_path / "pipelines")
    assert run.tables[0].held_back == ("nickname",)
    assert run.tables[0].rows_loaded == 1  # the row itself is loaded, without the unclassified column
    assert "new column(s) nickname NOT loaded" in format_loads([run])
    assert not any("Lele" in str(v) for row in warehouse.query("SELECT * FROM raw_app_db.volunteers") for v in row)

    # Classified as not personal: the next run reloads the table with it (every row gets its value).
    declaration = tmp_path / "declarations" / "app_db.yaml"
    declaration.parent.mkdir()
    text = (PROJECT_ROOT / "pipelines" / "app_db.yaml").read_text()
    declaration.write_text(text.replace("      postcode: drop\n", "      postcode: drop\n      nickname: keep\n"))
    app_source.execute("UPDATE volunteers SET updated_at = '2026-01-03 00:00:00' WHERE id = 1")
    run = run_pipeline(
        load_declaration(declaration), warehouse, tables=["volunteers"], pipelines_dir=tmp_path / "pipelines"
    )
    assert run.tables[0].new_columns == ("nickname",) and run.tables[0].held_back == ()
    assert warehouse.query("SELECT nickname FROM raw_app_db.volunteers WHERE id = 1") == [("Lele",)]


def test_state_lives_in_the_warehouse_a_fresh_worker_continues(
    warehouse: Warehouse, app_source: Source, tmp_path: Path
) -> None:
    assert _load(warehouse, tmp_path) == {"volunteers": 3}
    fresh_worker = tmp_path / "fresh-worker"
    run = run_pipeline(load_named("app_db"), warehouse, tables=["volunteers"], pipelines_dir=fresh_worker)
    assert run.tables[0].rows_loaded == 0
    assert run.tables[0].rows_in_warehouse == 3


def test_missing_pseudonymisation_key_stops_before_extraction(
    app_source: Source, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DATAMART__PII_HMAC_KEY")  # tests never read the developer's .dlt/secrets.toml
    warehouse = Warehouse(target="duckdb", duckdb_path=tmp_path / "wh.duckdb")
    with pytest.raises(SettingsError, match=r"datamart\.pii_hmac_key is not set: nothing was extracted"):
        _load(warehouse, tmp_path)
    assert not (tmp_path / "wh.duckdb").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: bad\nsource: {kind: sql_database}\ndataset: raw\nsurprise: 1\ntables: {t: {}}\n", "surprise: unknown"),
        (
            "name: bad\nsource: {kind: sql_database}\ndataset: raw\ntables: {t: {write_disposition: merge}}\n",
            "tables.t.primary_key: a merge table needs a primary_key",
        ),
        (
            "name: bad\nsource: {kind: sql_database}\ndataset: raw\ntables: {t: {personal: {email: encrypt}}}\n",
            "tables.t.personal.email: 'encrypt' is not one of",
        ),
        (
            "name: bad\nsource: {kind: sql_database}\ndataset: raw\n"
            "tables: {t: {write_disposition: replace, cursor: updated_at}}\n",
            "tables.t.cursor: a replace table is emptied when a run reads nothing new",
        ),
        (
            "name: bad\nsource: {kind: sql_database}\ndataset: raw\n"
            "tables: {t: {write_disposition: append, deletes: {hard: key_set}}}\n",
            "tables.t.deletes: deletes apply to merge tables only",
        ),
        (
            "name: bad\nsource: {kind: sql_database}\ndataset: raw\n"
            "tables: {t: {write_disposition: merge, primary_key: id, deletes: {hard: guess}}}\n",
            "tables.t.deletes.hard: 'guess' is not a method; use key_set",
        ),
        ("name: bad\nsource: {kind: ftp}\ndataset: raw\ntables: {t: {}}\n", "source.kind: 'ftp' is not one of"),
        (
            "name: bad\nsource: {kind: sql_database, scheam: app}\ndataset: raw\ntables: {t: {}}\n",
            "source.scheam: unknown key (did you mean 'schema'?); allowed: backend, changes, chunk_size, kind, "
            "max_retained_wal, publication, schema, slot",
        ),
        (
            "name: bad\nsource: {kind: sql_database, changes: replicaton}\ndataset: raw\ntables: {t: {}}\n",
            "source.changes: 'replicaton' is not one of cursor, replication (did you mean 'replication'?)",
        ),
        (
            "name: bad\nsource: {kind: sql_database, changes: replication}\ndataset: raw\n"
            "tables: {t: {write_disposition: append}}\n",
            "tables.t.write_disposition: changes: replication applies each change by key",
        ),
        (
            "name: bad\nsource: {kind: sql_database, slot: s}\ndataset: raw\ntables: {t: {}}\n",
            "source.slot: belongs to changes: replication (its slot and publication)",
        ),
        (
            "name: bad\nsource: {kind: sql_database, max_retained_wal: 1GB}\ndataset: raw\ntables: {t: {}}\n",
            "source.max_retained_wal: belongs to changes: replication",
        ),
        (
            "name: bad\nsource: {kind: sql_database, changes: replication, max_retained_wal: 1 GiB}\ndataset: raw\n"
            "tables: {t: {write_disposition: merge, primary_key: id}}\n",
            "source.max_retained_wal: '1 GiB' is not a size: write a positive number and kB, MB, GB or TB, e.g. 1GB",
        ),
        (
            "name: bad\nsource: {kind: filesystem, bucket: s3://x}\ndataset: raw\ntables: {t: {}}\n",
            "source.bucket: unknown key; allowed: chunk_size, kind",
        ),
        (
            "name: bad\nsource: {kind: sql_database}\ndataset: raw\ntables: {t: {personnal: {email: hash}}}\n",
            "tables.t.personnal: unknown key (did you mean 'personal'?)",
        ),
        (
            "name: bad\nsource: {kind: sql_database}\ndataset: raw\ntables: {t: {personal: {email: hsah}}}\n",
            "tables.t.personal.email: 'hsah' is not one of ('hash', 'drop', 'year', 'keep') (did you mean 'hash'?)",
        ),
    ],
)
def test_declaration_mistakes_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(DeclarationError) as error:
        load_declaration(path)
    assert str(error.value).startswith("bad.yaml: ")
    assert message in str(error.value)


def test_a_cursor_missing_from_the_source_stops_before_anything_is_loaded(
    warehouse: Warehouse, app_source: Source, tmp_path: Path
) -> None:
    path = tmp_path / "app_db.yaml"
    text = (PROJECT_ROOT / "pipelines" / "app_db.yaml").read_text()
    path.write_text(
        text.replace(
            "cursor: updated_at\n    deletes: {hard: key_set}   # a right",
            "cursor: updatedAt\n    deletes: {hard: key_set}   # a right",
        )
    )
    with pytest.raises(
        DeclarationError, match=r"app_db.yaml: tables.volunteers.cursor: column 'updatedAt' does not exist"
    ):
        run_pipeline(load_declaration(path), warehouse, tables=["volunteers"], pipelines_dir=tmp_path / "p")
    assert not warehouse.table_exists("raw_app_db", "volunteers")


def test_a_misspelt_personal_column_stops_before_anything_is_read(
    warehouse: Warehouse, app_source: Source, tmp_path: Path
) -> None:
    """``emial: hash`` would leave ``email`` unclassified and load it in clear: ``dlt pipeline app_db run`` refuses
    (exit 2), naming the closest column, and nothing reaches the warehouse."""
    declarations = tmp_path / "declarations"
    declarations.mkdir()
    text = (DEMO_PIPELINES_DIR / "app_db.yaml").read_text()
    assert "      email: hash" in text
    (declarations / "app_db.yaml").write_text(text.replace("      email: hash", "      emial: hash"))
    env = dict(
        os.environ,
        DATAMART_DECLARATIONS_DIR=str(declarations),
        DATAMART_PIPELINES_DIR=str(tmp_path / "dlt"),
        SOURCES__APP_DB__CREDENTIALS=app_source.url,
        DATAMART__PII_HMAC_KEY=KEY,
    )
    env.update(warehouse.environment_variables())
    result = dlt(env, "pipeline", "app_db", "run", "--table", "volunteers")
    assert result.returncode == 2, result.stdout + result.stderr
    assert (
        "app_db.yaml: tables.volunteers.personal.emial: the source table volunteers has no column 'emial' "
        "(did you mean 'email'?); its columns: id, email, first_name"
    ) in result.stderr, result.stderr
    assert not warehouse.table_exists("raw_app_db", "volunteers")


def test_unknown_pipeline_lists_the_known_ones() -> None:
    with pytest.raises(DeclarationError, match=r"no pipeline named 'nope'.*known pipelines: app_db, bucket"):
        load_named("nope")
