"""Bad input: each case stops with an error naming pipeline, table, file or column and the fix — or behaves as the
README documents — and nothing of it is published. Real files, a real SQLite/PostgreSQL source, a real local HTTP
server, real DuckDB/PostgreSQL warehouses.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from datamart.ingest.cli import failure_message
from datamart.ingest.declarations import DeclarationError, PipelineDecl, load_declaration
from datamart.ingest.runner import PipelineRun, run_pipeline
from datamart.ingest.sources import _unique_in_source
from datamart.settings import Warehouse
from datamart.testing.sources import Source


def declare(tmp_path: Path, raw: dict[str, Any]) -> PipelineDecl:
    """Write a declaration as ``<name>.yaml`` and read it the way the project does."""
    folder = tmp_path / "declarations"
    folder.mkdir(exist_ok=True)
    path = folder / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return load_declaration(path)


def run(decl: PipelineDecl, warehouse: Warehouse, tmp_path: Path) -> PipelineRun:
    """One run with the project's runner."""
    return run_pipeline(decl, warehouse, pipelines_dir=tmp_path / "dlt")


def failure(decl: PipelineDecl, warehouse: Warehouse, tmp_path: Path) -> str:
    """The message `dlt pipeline <name> run` prints for a run that must fail."""
    with pytest.raises(Exception) as raised:  # noqa: PT011 - the message is what is checked
        run(decl, warehouse, tmp_path)
    return failure_message(decl, raised.value)


def rows(warehouse: Warehouse, table: str) -> int:
    """Rows in a raw table, 0 when it was never created."""
    schema, name = table.split(".")
    return warehouse.query(f"SELECT count(*) FROM {table}")[0][0] if warehouse.table_exists(schema, name) else 0


@pytest.fixture
def duckdb_warehouse(tmp_path: Path) -> Warehouse:
    """A DuckDB warehouse file: the file cases are about the input, not the warehouse."""
    return Warehouse(target="duckdb", duckdb_path=tmp_path / "warehouse.duckdb")


# --- files ---------------------------------------------------------------------------------------------------------

GOOD_CSV = "partner_id,name,kind\n1,Portail,widget\n2,Emploi,jobboard\n"


@pytest.fixture
def bucket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A local bucket folder, given to the `files` pipeline the dlt way."""
    folder = tmp_path / "bucket"
    folder.mkdir()
    monkeypatch.setenv("SOURCES__FILES__BUCKET_URL", str(folder))
    return folder


def files_pipeline(tmp_path: Path, files: str, fmt: str, key: list[str] | str = "partner_id") -> PipelineDecl:
    """A filesystem pipeline reading ``files`` into raw_files.partners (merge on partner_id)."""
    table = {"files": files, "format": fmt, "write_disposition": "merge", "primary_key": key}
    table["cursor"] = "modification_date"
    return declare(tmp_path, {"name": "files", "source": {"kind": "filesystem"}, "dataset": "raw_files",
                              "tables": {"partners": table}})  # fmt: skip


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (GOOD_CSV + "3,Atlas,api,extra\n", "line 4 has 4 fields, the header 3"),  # wrong column count
        (GOOD_CSV.encode() + "3,Soci\xe9t\xe9,api\n".encode("latin-1"), "is not UTF-8 text"),  # bad encoding
        (GOOD_CSV + "3,Atl", "line 4 has 2 fields, the header 3"),  # truncated mid-row
        (GOOD_CSV + '3,"Atlas', "unexpected end of data"),  # truncated inside a quoted field
        (GOOD_CSV + ",Atlas,api\n", "1 row(s) with a null primary key (partner_id)"),  # an empty key field
    ],
    ids=["wrong-column-count", "not-utf8", "truncated-row", "truncated-quote", "empty-key"],
)
def test_malformed_csv_stops_naming_the_file_and_loads_nothing(
    content: str | bytes, message: str, bucket: Path, duckdb_warehouse: Warehouse, tmp_path: Path
) -> None:
    (bucket / "a_good.csv").write_text(GOOD_CSV)
    bad = bucket / "b_bad.csv"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    decl = files_pipeline(tmp_path, "*.csv", "csv")

    error = failure(decl, duckdb_warehouse, tmp_path)
    assert "pipeline 'files', table partners" in error and message in error, error
    assert "file b_bad.csv" in error or "primary_key in files.yaml" in error
    assert rows(duckdb_warehouse, "raw_files.partners") == 0, "not even the good file's rows are published"

    bad.write_text("partner_id,name,kind\n3,Atlas,api\n")  # the file is replaced: the next run reads everything
    run(decl, duckdb_warehouse, tmp_path)
    assert rows(duckdb_warehouse, "raw_files.partners") == 3


def test_empty_file_is_skipped_then_read_when_written(
    bucket: Path, duckdb_warehouse: Warehouse, tmp_path: Path
) -> None:
    (bucket / "a_good.csv").write_text(GOOD_CSV)
    empty = bucket / "b_empty.csv"
    empty.write_text("")
    decl = files_pipeline(tmp_path, "*.csv", "csv")
    run(decl, duckdb_warehouse, tmp_path)
    assert rows(duckdb_warehouse, "raw_files.partners") == 2

    time.sleep(0.01)
    empty.write_text("partner_id,name,kind\n3,Atlas,api\n")  # written again: a new modification date
    assert run(decl, duckdb_warehouse, tmp_path).tables[0].rows_loaded == 1
    assert rows(duckdb_warehouse, "raw_files.partners") == 3


def _parquet(path: Path, columns: dict[str, pa.Array]) -> None:
    pq.write_table(pa.table(columns), path)


def test_parquet_with_a_changed_type_stops_naming_table_and_column(
    bucket: Path, duckdb_warehouse: Warehouse, tmp_path: Path
) -> None:
    _parquet(bucket / "day1.parquet", {"partner_id": pa.array([1, 2]), "clicks": pa.array([10, 20])})
    decl = files_pipeline(tmp_path, "*.parquet", "parquet")
    run(decl, duckdb_warehouse, tmp_path)

    changed = bucket / "day2.parquet"  # the exporter now writes clicks as text
    _parquet(changed, {"partner_id": pa.array([3]), "clicks": pa.array(["N/A"])})
    error = failure(decl, duckdb_warehouse, tmp_path)
    assert "partners" in error and "clicks" in error, error
    assert rows(duckdb_warehouse, "raw_files.partners") == 2, "nothing of day 2 is published"

    _parquet(changed, {"partner_id": pa.array([3]), "clicks": pa.array([30])})  # re-exported with the old type
    run(decl, duckdb_warehouse, tmp_path)
    assert duckdb_warehouse.query("SELECT sum(clicks) FROM raw_files.partners") == [(60,)]


def test_parquet_with_a_new_column_evolves_and_truncated_parquet_stops(
    bucket: Path, duckdb_warehouse: Warehouse, tmp_path: Path
) -> None:
    _parquet(bucket / "day1.parquet", {"partner_id": pa.array([1, 2]), "clicks": pa.array([10, 20])})
    _parquet(bucket / "day2.parquet", {"partner_id": pa.array([3]), "clicks": pa.array([5]), "views": pa.array([9])})
    decl = files_pipeline(tmp_path, "*.parquet", "parquet")
    assert run(decl, duckdb_warehouse, tmp_path).tables[0].rows_loaded == 3
    assert duckdb_warehouse.query("SELECT count(views) FROM raw_files.partners") == [(1,)]

    data = (bucket / "day2.parquet").read_bytes()
    (bucket / "day3.parquet").write_bytes(data[: len(data) // 2])  # an upload cut in the middle
    error = failure(decl, duckdb_warehouse, tmp_path)
    assert "pipeline 'files', table partners: file day3.parquet cannot be read" in error, error


# --- rows of a SQL source ------------------------------------------------------------------------------------------


@pytest.fixture
def sqlite_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Source:
    """An empty SQLite application database, the `app` pipeline's source."""
    url = f"sqlite:///{tmp_path / 'app.sqlite'}"
    monkeypatch.setenv("SOURCES__APP__CREDENTIALS", url)
    return Source(url)


def app_pipeline(tmp_path: Path, tables: dict[str, Any]) -> PipelineDecl:
    """A sql_database pipeline `app` loading into raw_app."""
    return declare(tmp_path, {"name": "app", "source": {"kind": "sql_database"}, "dataset": "raw_app",
                              "tables": tables})  # fmt: skip


PEOPLE = {"people": {"write_disposition": "merge", "primary_key": "id", "cursor": "updated_at"}}


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ([1, None, 3], "1 row(s) with a null primary key (id)"),
        ([1, 2, 2], "1 primary key value(s) on more than one row, e.g. [{'id': 2}]"),
    ],
    ids=["null-key", "duplicated-key"],
)
def test_bad_primary_key_stops_before_anything_is_loaded(
    ids: list[int | None], message: str, sqlite_source: Source, duckdb_warehouse: Warehouse, tmp_path: Path
) -> None:
    sqlite_source.execute("CREATE TABLE people (id INTEGER, name TEXT, updated_at TIMESTAMP)")
    sqlite_source.execute("INSERT INTO people VALUES (?, ?, '2025-01-01 10:00:00')", rows=[(i, f"p{i}") for i in ids])
    decl = app_pipeline(tmp_path, PEOPLE)
    error = failure(decl, duckdb_warehouse, tmp_path)
    assert "pipeline 'app', table people" in error and message in error, error
    assert "app.yaml" in error
    assert rows(duckdb_warehouse, "raw_app.people") == 0

    sqlite_source.execute(
        "DELETE FROM people WHERE id IS NULL "
        "OR rowid IN (SELECT max(rowid) FROM people GROUP BY id HAVING count(*) > 1)"
    )
    run(decl, duckdb_warehouse, tmp_path)  # fixed in the source: nothing blocks the next run
    assert rows(duckdb_warehouse, "raw_app.people") == 2


def test_a_key_the_source_does_not_enforce_is_still_loaded_once(
    sqlite_source: Source, warehouse: Warehouse, tmp_path: Path
) -> None:
    """Staged rows skip dlt's dedup only where the source enforces the key: here it does not, and the repeat falls
    in another chunk than the first (the per-chunk check cannot see it)."""
    sqlite_source.execute("CREATE TABLE people (id INTEGER, name TEXT, updated_at TIMESTAMP)")  # no primary key
    people = [(1, "a"), (2, "b"), (3, "c"), (2, "b again")]  # chunks of 2: (1, 2) then (3, 2)
    sqlite_source.execute("INSERT INTO people VALUES (?, ?, '2025-01-01 10:00:00')", rows=people)
    decl = declare(tmp_path, {"name": "app", "source": {"kind": "sql_database", "chunk_size": 2}, "dataset": "raw_app",
                              "tables": PEOPLE})  # fmt: skip
    run(decl, warehouse, tmp_path)
    per_key = warehouse.query("SELECT id, count(*) FROM raw_app.people GROUP BY id ORDER BY id")
    assert per_key == [(1, 1), (2, 1), (3, 1)]

    sqlite_source.execute("CREATE TABLE people_keyed (id INTEGER PRIMARY KEY, name TEXT, updated_at TIMESTAMP)")
    tables = {"people": PEOPLE["people"], "people_keyed": PEOPLE["people"]}
    keyed = declare(tmp_path, {"name": "app", "source": {"kind": "sql_database"}, "dataset": "raw_app",
                               "tables": tables})  # fmt: skip
    assert _unique_in_source(keyed, list(keyed.tables)) == {"people_keyed"}


def test_null_cursor_stops_naming_table_and_cursor(
    sqlite_source: Source, duckdb_warehouse: Warehouse, tmp_path: Path
) -> None:
    sqlite_source.execute("CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT, updated_at TIMESTAMP)")
    sqlite_source.execute("INSERT INTO people VALUES (?, ?, ?)", rows=[(1, "a", "2025-01-01 10:00:00"), (2, "b", None)])
    decl = app_pipeline(tmp_path, PEOPLE)
    error = failure(decl, duckdb_warehouse, tmp_path)
    assert "table people" in error and "rows of people have no updated_at value" in error, error
    assert rows(duckdb_warehouse, "raw_app.people") == 0


@pytest.mark.postgres
def test_value_too_large_for_its_column(pg_database_factory: Callable[[str], str], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from datamart.settings import postgres_warehouse

    source_url = pg_database_factory("source")
    warehouse = postgres_warehouse(pg_database_factory("warehouse"))
    monkeypatch.setenv("SOURCES__APP__CREDENTIALS", source_url)
    source = Source(source_url)
    source.execute(
        "CREATE TABLE codes (id integer PRIMARY KEY, code varchar(5), amount numeric(6, 2), updated_at timestamp)",
        "INSERT INTO codes VALUES (1, 'abc', 12.5, '2025-01-01 10:00')",
    )
    decl = app_pipeline(tmp_path, {"codes": {"write_disposition": "merge", "primary_key": "id",
                                             "cursor": "updated_at"}})  # fmt: skip
    run(decl, warehouse, tmp_path)
    # the application widens a text column and writes a value the first load's column could not hold
    source.execute(
        "ALTER TABLE codes ALTER COLUMN code TYPE varchar(50)",
        "INSERT INTO codes VALUES (2, 'a much longer code', 1, '2025-01-02 10:00')",
    )
    outcome = run(decl, warehouse, tmp_path)
    assert outcome.tables[0].rows_loaded == 1
    assert warehouse.query("SELECT code FROM raw_app.codes WHERE id = 2") == [("a much longer code",)]
    # then a number whose precision grows: the column is migrated to the new precision and the table reloaded
    source.execute(
        "ALTER TABLE codes ALTER COLUMN amount TYPE numeric(20, 2)",
        "INSERT INTO codes VALUES (3, 'c', 123456789012.25, '2025-01-03 10:00')",
    )
    widened = run(decl, warehouse, tmp_path)
    assert widened.tables[0].rows_in_warehouse == 3
    assert "column amount retyped numeric(6,2) → numeric(20,2), table reloaded (3 rows, " in widened.tables[0].change
    assert warehouse.query("SELECT amount FROM raw_app.codes WHERE id = 3") == [(pytest.approx(123456789012.25),)]


@pytest.mark.postgres
def test_a_row_the_warehouse_refuses_is_a_data_error_not_a_lost_connection(
    sqlite_source: Source, pg_database_factory: Callable[[str], str], tmp_path: Path
) -> None:
    """Rows of an append table are copied straight into it (parquet through ADBC's COPY): the warehouse's refusal
    comes back from the ADBC driver, which dlt files as transient. It is a data error: not retried, not reported as
    a connection problem."""
    from datamart.ingest.cli import run_with_retries
    from datamart.settings import postgres_warehouse

    warehouse = postgres_warehouse(pg_database_factory("warehouse"))
    sqlite_source.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, n INTEGER)", "INSERT INTO events VALUES (1, 5)")
    decl = app_pipeline(tmp_path, {"events": {"write_disposition": "append", "primary_key": "id", "cursor": "id"}})
    run(decl, warehouse, tmp_path)
    warehouse.query("ALTER TABLE raw_app.events ADD CONSTRAINT n_below_100 CHECK (n < 100)")  # a warehouse rule
    sqlite_source.execute("INSERT INTO events VALUES (2, 500)")
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(Exception) as raised:
        run_with_retries(decl, warehouse, attempts=3, pipelines_dir=tmp_path / "dlt", backoff=0, out=out, err=err)
    assert "retry" not in err.getvalue(), "a data error is not retried"
    error = failure_message(decl, raised.value)
    assert "n_below_100" in error and "could not be reached" not in error, error
    assert rows(warehouse, "raw_app.events") == 1


# --- identifiers -----------------------------------------------------------------------------------------------------


def test_identifiers_that_need_quoting(warehouse: Warehouse, sqlite_source: Source, tmp_path: Path) -> None:
    sqlite_source.execute(
        'CREATE TABLE "Order Lines" ("Line ID" INTEGER PRIMARY KEY, "Select" TEXT, "Unit Price" REAL, '
        '"Updated At" TIMESTAMP)',
    )
    sqlite_source.execute(
        'INSERT INTO "Order Lines" VALUES (?, ?, ?, ?)',
        rows=[(i, f"s{i}", i * 1.5, f"2025-01-0{i} 10:00:00") for i in range(1, 5)],
    )
    tables = {"Order Lines": {"write_disposition": "merge", "primary_key": "Line ID", "cursor": "Updated At",
                              "deletes": {"hard": "key_set"}}}  # fmt: skip
    decl = app_pipeline(tmp_path, tables)
    first = run(decl, warehouse, tmp_path)
    assert (first.tables[0].rows_loaded, first.tables[0].rows_in_warehouse) == (4, 4)
    assert warehouse.query('SELECT "select" FROM raw_app.order_lines WHERE line_id = 2') == [("s2",)]

    sqlite_source.execute('DELETE FROM "Order Lines" WHERE "Line ID" = 3')  # a hard delete, found by key set
    second = run(decl, warehouse, tmp_path)
    assert (second.tables[0].rows_deleted, second.tables[0].rows_in_warehouse) == (1, 3)
    assert warehouse.query("SELECT line_id FROM raw_app.order_lines ORDER BY line_id") == [(1,), (2,), (4,)]


HOSTILE = 'x"; DROP TABLE sentinel; --'


def test_hostile_names_in_a_declaration_are_never_executed(
    warehouse: Warehouse, sqlite_source: Source, tmp_path: Path
) -> None:
    sqlite_source.execute("CREATE TABLE sentinel (id INTEGER PRIMARY KEY)", "INSERT INTO sentinel VALUES (1)")
    sqlite_source.execute("CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT, updated_at TIMESTAMP)")
    sqlite_source.execute("INSERT INTO people VALUES (1, 'a', '2025-01-01 10:00:00')")
    warehouse.query("CREATE TABLE sentinel (id INTEGER)")

    hostile_table = app_pipeline(tmp_path, {HOSTILE: {"write_disposition": "append"}})
    error = failure(hostile_table, warehouse, tmp_path)
    assert f"table {HOSTILE!r}" in error and "the source has no table" in error, error

    with pytest.raises(DeclarationError, match="does not exist in the source table people"):
        run(app_pipeline(tmp_path, {"people": {"write_disposition": "merge", "primary_key": HOSTILE}}), warehouse,
            tmp_path)  # fmt: skip

    hostile_keys = {"people": {"write_disposition": "merge", "primary_key": "id", "cursor": "updated_at",
                               "deletes": {"soft": HOSTILE, "hard": "key_set"}}}  # fmt: skip
    with pytest.raises(DeclarationError, match="deletes.soft: column 'x"):
        run(app_pipeline(tmp_path, hostile_keys), warehouse, tmp_path)

    with pytest.raises(DeclarationError, match="dataset: .* is not a plain schema name"):
        declare(tmp_path, {"name": "app", "source": {"kind": "sql_database"},
                           "dataset": 'raw"; DROP TABLE sentinel; --', "tables": PEOPLE})  # fmt: skip
    run(app_pipeline(tmp_path, PEOPLE), warehouse, tmp_path)  # the same pipeline, declared right, loads

    assert _sqlite_count(sqlite_source, "sentinel") == 1
    assert warehouse.table_exists("main" if warehouse.target == "duckdb" else "public", "sentinel")


def _sqlite_count(source: Source, table: str) -> int:
    import sqlite3

    with sqlite3.connect(source.url[len("sqlite:///") :]) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


# --- a REST API misbehaving ------------------------------------------------------------------------------------------


class ScriptedApi:
    """A local HTTP server answering GET /v1/items with the next scripted response (then the last one forever)."""

    def __init__(self, script: list[tuple[int, dict[str, str], bytes]]) -> None:
        self.script = script
        self.times: list[float] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                api.times.append(time.monotonic())
                status, headers, body = api.script[min(len(api.times), len(api.script)) - 1]
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def base_url(self) -> str:
        """The API root."""
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"


@pytest.fixture
def api_factory(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., ScriptedApi]]:
    """Start scripted APIs; dlt's HTTP retries made short (3 attempts, 0.1 s backoff) for the test."""
    monkeypatch.setenv("RUNTIME__REQUEST_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("RUNTIME__REQUEST_BACKOFF_FACTOR", "0.1")
    servers: list[ScriptedApi] = []

    def start(script: list[tuple[int, dict[str, str], bytes]]) -> ScriptedApi:
        servers.append(ScriptedApi(script))
        return servers[-1]

    yield start
    for api in servers:
        api.server.shutdown()
        api.server.server_close()


def page(items: list[dict[str, Any]], total_pages: int = 1) -> tuple[int, dict[str, str], bytes]:
    """A 200 answer holding ``items`` and the number of pages."""
    return 200, {}, json.dumps({"data": items, "meta": {"total_pages": total_pages}}).encode()


ITEMS = [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}]


def api_pipeline(tmp_path: Path, api: ScriptedApi) -> PipelineDecl:
    """A rest_api pipeline reading /v1/items, page-number pagination, into raw_api.items."""
    return declare(tmp_path, {
        "name": "api",
        "source": {"kind": "rest_api", "base_url": api.base_url,
                   "paginator": {"type": "page_number", "base_page": 1, "page_param": "page",
                                 "total_path": "meta.total_pages"}},
        "dataset": "raw_api",
        "tables": {"items": {"write_disposition": "merge", "primary_key": "id",
                             "endpoint": {"path": "items", "data_selector": "data"}}},
    })  # fmt: skip


def test_rest_500_is_retried_then_reported(
    api_factory: Callable[..., ScriptedApi], duckdb_warehouse: Warehouse, tmp_path: Path
) -> None:
    api = api_factory([(500, {}, b'{"error": "boom"}'), page(ITEMS)])
    assert run(api_pipeline(tmp_path, api), duckdb_warehouse, tmp_path).tables[0].rows_loaded == 2
    assert len(api.times) == 2

    down = api_factory([(500, {}, b'{"error": "boom"}')])
    error = failure(api_pipeline(tmp_path, down), duckdb_warehouse, tmp_path)
    assert "pipeline 'api' failed" in error and "500" in error and "/v1/items" in error, error
    assert len(down.times) == 3


def test_rest_429_waits_for_retry_after(
    api_factory: Callable[..., ScriptedApi], duckdb_warehouse: Warehouse, tmp_path: Path
) -> None:
    api = api_factory([(429, {"Retry-After": "1"}, b"{}"), page(ITEMS)])
    assert run(api_pipeline(tmp_path, api), duckdb_warehouse, tmp_path).tables[0].rows_loaded == 2
    assert api.times[1] - api.times[0] >= 0.9, "the client waited as the API asked"


def test_rest_invalid_json_stops_and_loads_nothing(
    api_factory: Callable[..., ScriptedApi], duckdb_warehouse: Warehouse, tmp_path: Path
) -> None:
    api = api_factory([(200, {}, b'{"data": [{"id": 1, "name": "one"}, {"id": 2, "na')])
    error = failure(api_pipeline(tmp_path, api), duckdb_warehouse, tmp_path)
    assert "pipeline 'api' failed" in error and "items" in error, error
    assert rows(duckdb_warehouse, "raw_api.items") == 0


def test_rest_endless_pagination_stops(
    api_factory: Callable[..., ScriptedApi], duckdb_warehouse: Warehouse, tmp_path: Path
) -> None:
    # The API ignores ?page= and always claims a million pages: the same page comes back forever.
    api = api_factory([page(ITEMS, total_pages=1_000_000)])
    error = failure(api_pipeline(tmp_path, api), duckdb_warehouse, tmp_path)
    assert "pipeline 'api', table items: the API returned a page it had already returned" in error, error
    assert len(api.times) == 2
    assert rows(duckdb_warehouse, "raw_api.items") == 0
