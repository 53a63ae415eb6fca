"""Replication mode (`changes: replication`): a PostgreSQL source read by logical decoding, through
`dlt pipeline <name> run` as a user runs it, into DuckDB and PostgreSQL warehouses.

One throwaway cluster with wal_level=logical for the module: it holds the sources and the PostgreSQL warehouses.
After every run the warehouse equals the source row for row (every non-personal value; the personal ones treated).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from datamart.ingest.personal import pseudonym
from datamart.settings import PROJECT_ROOT, Warehouse, postgres_warehouse
from datamart.testing.postgres import ThrowawayPostgres, create_database
from datamart.testing.sources import Source, source_rows

DLT = str(Path(sys.executable).parent / "dlt")
KEY = "replication-test-key"

pytestmark = pytest.mark.postgres

DECLARATION = {
    "name": "shop",
    "source": {"kind": "sql_database", "changes": "replication"},
    "dataset": "raw_shop",
    "tables": {
        "accounts": {
            "write_disposition": "merge",
            "primary_key": "id",
            "personal": {"email": "hash", "birth_date": "year"},
        },
        "ledger": {"write_disposition": "merge", "primary_key": "id"},  # no update timestamp at all
        "events": {"write_disposition": "merge", "primary_key": ["id", "day"]},  # partitioned by day
        "docs": {"write_disposition": "merge", "primary_key": "id"},  # a TOASTed body
        "tags": {"write_disposition": "merge", "primary_key": "code"},  # no primary key: REPLICA IDENTITY FULL
    },
}

SCHEMA = [
    "CREATE TABLE accounts (id int PRIMARY KEY, name text, email text, birth_date date, balance numeric(12,2))",
    "CREATE TABLE ledger (id int PRIMARY KEY, amount numeric(10,2), note text)",
    "CREATE TABLE events (id int, day date, label text, PRIMARY KEY (id, day)) PARTITION BY RANGE (day)",
    "CREATE TABLE events_2024 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')",
    "CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')",
    "CREATE TABLE docs (id int PRIMARY KEY, version int, body text)",
    "CREATE TABLE tags (code text NOT NULL, label text)",
    "ALTER TABLE tags REPLICA IDENTITY FULL",
]


def big_text() -> str:
    """About 20 kB that compression cannot bring under 2 kB: stored out of line (TOASTed)."""
    return secrets.token_hex(10_000)


def declare(folder: Path, **changes: Any) -> None:
    folder.mkdir(exist_ok=True)
    declaration = {**DECLARATION, "source": {**DECLARATION["source"], **changes}}
    (folder / "shop.yaml").write_text(yaml.safe_dump(declaration, sort_keys=False), encoding="utf-8")


def environment(tmp_path: Path, source_url: str, warehouse: Warehouse) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DESTINATION__", "SOURCES__", "DATAMART_"))}
    env.update(
        SOURCES__SHOP__CREDENTIALS=source_url,
        DATAMART__PII_HMAC_KEY=KEY,
        DATAMART_PIPELINES_DIR=str(tmp_path / "pipelines"),
        DATAMART_DECLARATIONS_DIR=str(tmp_path / "declarations"),
        **warehouse.environment_variables(),
    )
    return env


def dlt(env: dict[str, str], *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DLT, *args], env={**env, **extra}, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300
    )


def run(env: dict[str, str], **extra: str) -> str:
    result = dlt(env, "pipeline", "shop", "run", **extra)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def normal(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Rows comparable across engines: decimals by value."""
    return sorted(tuple(float(v) if isinstance(v, Decimal) else v for v in row) for row in rows)


def assert_equal(url: str, warehouse: Warehouse) -> None:
    """The warehouse equals the source, table by table, row by row; personal values treated, never in clear."""
    key = KEY.encode()
    source = source_rows(url, "SELECT id, name, email, extract(year FROM birth_date)::int, balance FROM accounts")
    expected = [(i, n, pseudonym(key, e), y, b) for i, n, e, y, b in source]
    loaded = warehouse.query("SELECT id, name, email, birth_year, balance FROM raw_shop.accounts")
    assert normal(loaded) == normal(expected)
    assert "birth_date" not in {c for (c,) in warehouse.query(_columns("accounts"))}
    for table, columns in (
        ("ledger", "id, amount, note"),
        ("events", "id, day, label"),
        ("docs", "id, version, body"),
        ("tags", "code, label"),
    ):
        wanted = normal(source_rows(url, f"SELECT {columns} FROM {table}"))
        assert normal(warehouse.query(f"SELECT {columns} FROM raw_shop.{table}")) == wanted, table


def _columns(table: str) -> str:
    return (
        f"SELECT column_name FROM information_schema.columns WHERE table_schema = 'raw_shop' AND table_name = '{table}'"
    )


def counts(summary: str, table: str) -> tuple[int, ...]:
    """read, inserted, updated, deleted, in warehouse: the summary line of ``raw_shop.<table>``."""
    line = next(line for line in summary.splitlines() if line.startswith(f"raw_shop.{table} "))
    return tuple(int(n.replace(",", "")) for n in re.findall(r"[\d,]+", line.split(maxsplit=1)[1]))


@pytest.fixture(params=["duckdb", "postgres"])
def setup(
    request: pytest.FixtureRequest, logical: ThrowawayPostgres, tmp_path: Path
) -> Iterator[tuple[Source, dict[str, str], Warehouse]]:
    """A source database with the schema and first rows, a warehouse of each kind, and the command's environment."""
    url = create_database(logical.url(), f"src_{uuid.uuid4().hex[:8]}")
    if request.param == "duckdb":
        warehouse = Warehouse(target="duckdb", duckdb_path=tmp_path / "warehouse.duckdb")
    else:
        warehouse = postgres_warehouse(create_database(logical.url(), f"wh_{uuid.uuid4().hex[:8]}"))
    source = Source(url)
    source.execute(
        *SCHEMA,
        "INSERT INTO accounts SELECT i, 'name ' || i, 'person' || i || '@example.org', date '1980-01-01' + i * 400, "
        "i * 10.5 FROM generate_series(1, 20) i",
        "INSERT INTO ledger SELECT i, i * 1.25, 'line ' || i FROM generate_series(1, 30) i",
        "INSERT INTO events SELECT i, date '2025-01-01' + i, 'event ' || i FROM generate_series(1, 10) i",
        "INSERT INTO tags SELECT 't' || i, 'tag ' || i FROM generate_series(1, 5) i",
    )
    source.execute("INSERT INTO docs VALUES (?, ?, ?)", rows=[(i, 1, big_text()) for i in (1, 2, 3)])
    slot = f"datamart_shop_{request.param}"  # slots are the cluster's, not a database's: dropped after the test
    declare(tmp_path / "declarations", slot=slot)
    yield source, environment(tmp_path, url, warehouse), warehouse
    Source(logical.url()).execute(
        f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{slot}'"
    )


def test_changes_are_replicated_exactly(setup: tuple[Source, dict[str, str], Warehouse]) -> None:
    source, env, warehouse = setup
    url = source.url

    first = run(env)  # the publication, the slot, then the initial copy
    assert "initial copy" in first
    assert counts(first, "ledger")[-1] == 30
    assert_equal(url, warehouse)

    source.execute(
        "INSERT INTO accounts VALUES (21, 'new', 'new@example.org', '1999-05-05', 1)",
        "UPDATE ledger SET amount = amount + 100 WHERE id IN (1, 2, 3)",  # no timestamp to notice it by
        "DELETE FROM ledger WHERE id IN (10, 11)",
        "INSERT INTO events VALUES (100, '2024-03-01', 'backdated')",  # late, with an old date, into 2024
        "UPDATE events SET day = '2024-06-01' WHERE id = 5",  # moved to the other partition (a delete + an insert)
        "UPDATE docs SET version = 2 WHERE id = 1",  # the TOASTed body is not sent: it must stay
        "UPDATE tags SET label = 'renamed' WHERE code = 't1'",  # no primary key: the old row is sent whole
        "DELETE FROM tags WHERE code = 't2'",
    )
    source.execute("DELETE FROM accounts WHERE id = 2")
    source.execute("INSERT INTO accounts VALUES (2, 'back again', 'again@example.org', '1990-02-02', 7)")
    source.execute(  # a new large row and an update of it in the same batch: the body comes from the insert
        "INSERT INTO docs VALUES (4, 1, repeat(md5(random()::text), 700))",
        "UPDATE docs SET version = 5 WHERE id = 4",
    )
    # a new column of a table with personal columns is held back until classified, as in cursor mode
    source.execute(
        "ALTER TABLE accounts ADD COLUMN phone text", "UPDATE accounts SET phone = '0600000000' WHERE id = 3"
    )
    second = run(env)
    assert "new column(s) phone NOT loaded" in second
    assert "phone" not in {c for (c,) in warehouse.query(_columns("accounts"))}
    assert counts(second, "ledger") == (5, 0, 3, 2, 28)  # read, inserted, updated, deleted, in warehouse
    assert counts(second, "accounts")[1:] == (1, 2, 0, 21)  # id 2 deleted and inserted again: an update here
    assert_equal(url, warehouse)
    assert warehouse.query("SELECT length(body) FROM raw_shop.docs WHERE id = 1")[0][0] == 20_000

    # a run that loads, then fails before the slot is advanced: the next run reads the same changes again
    source.execute("UPDATE ledger SET note = 'corrected' WHERE id = 4", "DELETE FROM events WHERE id = 1")
    failed = dlt(env, "pipeline", "shop", "run", DATAMART_TEST_REPLICATION_FAIL="after-load")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    source.execute("UPDATE docs SET version = 3 WHERE id = 2", "INSERT INTO ledger VALUES (31, 9.99, 'late')")
    source.execute("TRUNCATE ledger", "INSERT INTO ledger VALUES (1, 1.00, 'after truncate')")  # a replace here
    started = time.monotonic()
    third = run(env)
    took = time.monotonic() - started
    assert counts(third, "ledger")[-1] == 1
    assert_equal(url, warehouse)

    # kill -9 late in a run (reading, loading or just loaded: wherever it is, the slot was not advanced), then a
    # normal run: nothing lost, nothing twice
    source.execute("UPDATE ledger SET amount = 2 WHERE id = 1", "INSERT INTO ledger VALUES (2, 3.00, 'killed run')")
    process = subprocess.Popen([DLT, "pipeline", "shop", "run"], env=env, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL)
    time.sleep(took * 0.8)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) in (-signal.SIGKILL, 0)  # 0: it finished first (a machine faster than before)
    after_kill = run(env)
    assert counts(after_kill, "ledger")[-1] == 2
    assert_equal(url, warehouse)

    # verify agrees (its key-by-key comparison applies unchanged; a key kept after a delete would be drift)
    verified = dlt(env, "pipeline", "shop", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def freshness(warehouse: Warehouse) -> dict[str, tuple[Any, ...]]:
    """``marts.data_freshness_v1`` of the warehouse, per table: the model's own query (SQLMesh's parser, the
    warehouse's dialect) run on the run records, without building the whole project for it."""
    from sqlmesh.core.dialect import parse

    query = parse((PROJECT_ROOT / "models/marts/data_freshness_v1.sql").read_text(), default_dialect="duckdb")[-1]
    columns = "table_name, replication_slot, slot_retained_wal_bytes, slot_lag_bytes, slot_above_max_retained_wal"
    rows = warehouse.query(f"SELECT {columns} FROM ({query.sql(dialect=warehouse.target)}) AS freshness")
    return {row[0]: tuple(row[1:]) for row in rows}


def scheduled_slots(env: dict[str, str], webhook: str) -> subprocess.CompletedProcess[str]:
    """``python -m datamart scheduled --only replication_slots``: the scheduled run's slot check, with its alert."""
    return subprocess.run(
        [sys.executable, "-m", "datamart", "scheduled", "--only", "replication_slots"],
        env={**env, "DATAMART__ALERT_WEBHOOK_URL": webhook},
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_slot_is_measured_alerted_and_dropped(
    setup: tuple[Source, dict[str, str], Warehouse], tmp_path: Path, webhook: tuple[str, list[str]]
) -> None:
    """Each run records its slot's retained WAL (as the source says it), the summary and marts.data_freshness_v1
    show it, the scheduled run alerts above source.max_retained_wal; drop-replication removes the slot and the
    publication, idempotently, and the next run copies every table again."""
    source, env, warehouse = setup
    slot = f"datamart_ops_{warehouse.target}"  # slots are the cluster's: test_changes_are_replicated_exactly's stay
    declare(tmp_path / "declarations", slot=slot, max_retained_wal="1MB")
    url, hook = webhook

    first = run(env)
    assert f"shop: slot '{slot}' retains " in first and "max_retained_wal 1.0 MB" in first, first
    (run_id, *recorded), *others = warehouse.query(
        "SELECT run_id, retained_wal_bytes, lag_bytes, restart_lsn, confirmed_flush_lsn, current_lsn "
        "FROM ops.replication_slots"
    )
    assert not others  # one measurement per run, made by the run that succeeded
    status = warehouse.query(f"SELECT status FROM ops.pipeline_runs WHERE run_id = '{run_id}'")
    assert status == [("succeeded",)]
    retained, lag, restart, confirmed, current = recorded
    # the source's own arithmetic on the recorded positions, and the slot has not moved since
    assert source.query(
        f"SELECT pg_wal_lsn_diff('{current}', '{restart}')::bigint, "
        f"pg_wal_lsn_diff('{current}', '{confirmed}')::bigint, restart_lsn::text, confirmed_flush_lsn::text "
        f"FROM pg_replication_slots WHERE slot_name = '{slot}'"
    ) == [(retained, lag, restart, confirmed)]
    assert freshness(warehouse)["ledger"] == (slot, retained, lag, False)

    # the source writes about 5 MB of WAL, into a table the pipeline does not read (a slot keeps the whole server's
    # WAL): above 1MB, the scheduled run fails and alerts. (The PostgreSQL warehouse shares the source's cluster
    # here: the WAL of a run's own load counts too, hence a threshold above an initial copy's.)
    source.execute("CREATE TABLE filler AS SELECT i, repeat('x', 200) AS pad FROM generate_series(1, 20000) i")
    alerted = scheduled_slots(env, url)
    assert alerted.returncode == 1, alerted.stdout + alerted.stderr
    alert = json.loads(hook[-1])["text"]  # the slot's name is redacted on PostgreSQL: it contains the password
    assert "- pipeline shop, step replication slots: slot 'datamart_ops_" in alert, alert
    assert "of WAL, ABOVE max_retained_wal, on the source" in alert and "max_retained_wal 1.0 MB" in alert
    assert "dlt pipeline shop drop-replication" in alert
    assert "alert posted to the webhook" in alerted.stdout

    # A slot's restart position moves to a snapshot record the server writes at most every 15 s while busy (a
    # checkpoint writes one now), and PostgreSQL takes the first one the run decodes past the last confirmed
    # position: when the server wrote one between the first run and the filler, that run leaves the filler retained
    # and the next one releases it. So: at most two runs, each after a checkpoint.
    for _attempt in range(2):
        source.execute("CHECKPOINT")
        second = run(env)  # reads the slot: the source may recycle that WAL
        assert f"slot '{slot}' retains " in second, second
        if "WARNING" not in second:
            break
    assert "WARNING" not in second, second
    assert freshness(warehouse)["ledger"][-1] is False
    assert_equal(source.url, warehouse)

    dropped = dlt(env, "pipeline", "shop", "drop-replication")
    assert dropped.returncode == 0, dropped.stdout + dropped.stderr
    assert f"slot '{slot}' dropped" in dropped.stdout and "publication 'datamart_shop' dropped" in dropped.stdout
    assert "which tables were copied: forgotten" in dropped.stdout
    assert source.query(f"SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'") == [(0,)]
    assert source.query("SELECT count(*) FROM pg_publication WHERE pubname = 'datamart_shop'") == [(0,)]
    again = dlt(env, "pipeline", "shop", "drop-replication")  # idempotent: nothing left to remove
    assert again.returncode == 0, again.stdout + again.stderr
    assert "not on the source: nothing to drop" in again.stdout and "copied: none recorded" in again.stdout

    source.execute("UPDATE ledger SET note = 'while no slot' WHERE id = 5", "DELETE FROM tags WHERE code = 't3'")
    fresh = run(env)  # a new slot and publication, then a whole copy: nothing the slot missed is lost
    assert "initial copy of accounts, ledger, events, docs, tags" in fresh, fresh
    assert_equal(source.url, warehouse)


def test_refusals_name_the_fix(logical: ThrowawayPostgres, pg_admin_url: str, tmp_path: Path) -> None:
    """Exit 2 with the setting or the SQL to run: a server without wal_level=logical, a user without REPLICATION,
    a user that may not publish the tables, a cursor on a replicated table, a source that is not PostgreSQL."""
    warehouse = Warehouse(target="duckdb", duckdb_path=tmp_path / "warehouse.duckdb")
    declare(tmp_path / "declarations")

    def refused(url: str) -> str:
        result = dlt(environment(tmp_path, url, warehouse), "pipeline", "shop", "run")
        assert result.returncode == 2, result.stdout + result.stderr
        return result.stderr

    plain = create_database(pg_admin_url, f"src_{uuid.uuid4().hex[:8]}")  # the session's cluster: wal_level=replica
    assert "ALTER SYSTEM SET wal_level = logical" in refused(plain)
    assert "not PostgreSQL" in refused(f"sqlite:///{tmp_path / 'app.sqlite'}")

    url = create_database(logical.url(), f"src_{uuid.uuid4().hex[:8]}")
    Source(url).execute(
        *SCHEMA, "CREATE ROLE reader LOGIN PASSWORD 'pw'", "GRANT SELECT ON ALL TABLES IN SCHEMA public TO reader"
    )
    as_reader = url.replace("postgres:postgres@", "reader:pw@")
    assert 'ALTER ROLE "reader" WITH REPLICATION;' in refused(as_reader)
    Source(url).execute("ALTER ROLE reader WITH REPLICATION")
    message = refused(as_reader)
    assert 'CREATE PUBLICATION "datamart_shop" FOR TABLE "public"."accounts"' in message, message

    # a table without a primary key is refused by name unless it has REPLICA IDENTITY FULL (SCHEMA sets it)
    Source(url).execute("ALTER TABLE tags REPLICA IDENTITY DEFAULT")
    message = refused(url)
    assert "tables.tags.primary_key: pipeline 'shop': table tags has no primary key" in message, message
    assert 'A DBA runs `ALTER TABLE "public"."tags" REPLICA IDENTITY FULL;`' in message
    assert "Keep primary_key: code in the declaration even so: the warehouse merges on it" in message

    # drop-replication by a user who may neither drop the slot (no REPLICATION) nor the publication (not its owner)
    Source(url).execute("CREATE PUBLICATION datamart_shop FOR TABLE accounts", "ALTER ROLE reader WITH NOREPLICATION")
    Source(url).execute("SELECT pg_create_logical_replication_slot('datamart_shop', 'pgoutput')")
    denied = dlt(environment(tmp_path, as_reader, warehouse), "pipeline", "shop", "drop-replication")
    assert denied.returncode == 2, denied.stdout + denied.stderr
    sql = """runs: SELECT pg_drop_replication_slot('datamart_shop'); DROP PUBLICATION "datamart_shop";"""
    assert sql in denied.stderr, denied.stderr
    as_owner = dlt(environment(tmp_path, url, warehouse), "pipeline", "shop", "drop-replication")
    assert as_owner.returncode == 0, as_owner.stdout + as_owner.stderr
    assert Source(url).query("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'datamart_shop'") == [(0,)]
    assert Source(url).query("SELECT count(*) FROM pg_publication") == [(0,)]

    declaration = yaml.safe_load((tmp_path / "declarations" / "shop.yaml").read_text())
    declaration["tables"]["ledger"]["cursor"] = "amount"
    (tmp_path / "declarations" / "shop.yaml").write_text(yaml.safe_dump(declaration))
    assert "tables.ledger.cursor: not needed with changes: replication" in refused(url)


def same_rows(url: str, warehouse: Warehouse, table: str, columns: str) -> None:
    """``columns`` of ``table``: the warehouse's rows equal the source's."""
    wanted = normal(source_rows(url, f"SELECT {columns} FROM {table}"))
    assert normal(warehouse.query(f"SELECT {columns} FROM raw_shop.{table}")) == wanted, table


def test_schema_changes_in_the_stream(setup: tuple[Source, dict[str, str], Warehouse]) -> None:
    """A column added with a DEFAULT (no row change) and a retyped column are applied by reloading that table
    while the others load their changes; a change made before the ALTER and read again after a failed run keeps
    the reloaded value of the new column; a dropped column stops its table only, which is copied again once the
    column is back."""
    source, env, warehouse = setup
    url = source.url
    run(env)  # the initial copy

    source.execute(
        "UPDATE ledger SET note = 'before the alter' WHERE id = 1",
        "UPDATE docs SET version = 7 WHERE id = 2",  # its TOASTed body unchanged, then the column retyped
        "ALTER TABLE ledger ADD COLUMN currency text NOT NULL DEFAULT 'EUR'",  # rewrites no row, sends no change
        "UPDATE ledger SET currency = 'USD' WHERE id = 2",
        "ALTER TABLE docs ALTER COLUMN version TYPE numeric(6,1)",
        "INSERT INTO events VALUES (200, '2025-06-01', 'while the others change')",
    )
    changed = run(env)
    assert "raw_shop.ledger: column currency added, table reloaded (30 rows, " in changed, changed
    assert re.search(
        r"raw_shop\.docs: column version retyped \w+ → (numeric|decimal)\(6,\s?1\), table reloaded", changed, re.I
    ), changed
    assert counts(changed, "events")[:2] == (1, 1)  # read, inserted: the other tables load their changes
    assert_equal(url, warehouse)
    same_rows(url, warehouse, "ledger", "id, amount, note, currency")

    # a run killed after the reload, before the slot moved: the next one reads the change made before the ALTER
    # again; it carries no rate, and must not blank the reloaded one
    source.execute("UPDATE ledger SET note = 'before the second alter' WHERE id = 3")
    source.execute("ALTER TABLE ledger ADD COLUMN rate int DEFAULT 3")
    failed = dlt(env, "pipeline", "shop", "run", DATAMART_TEST_REPLICATION_FAIL="after-load")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "raw_shop.ledger: column rate added" not in run(env)  # reloaded by the failed run already
    same_rows(url, warehouse, "ledger", "id, amount, note, currency, rate")
    assert_equal(url, warehouse)

    # a dropped column stops its table (exit 1, named), the others load
    source.execute(
        "ALTER TABLE events DROP COLUMN label",
        "UPDATE ledger SET amount = 0 WHERE id = 4",
        "DELETE FROM events WHERE id = 5",  # erased while its table is stopped: leaves the warehouse all the same
    )
    stopped = dlt(env, "pipeline", "shop", "run")
    assert stopped.returncode == 1, stopped.stdout + stopped.stderr
    assert warehouse.query("SELECT count(*) FROM raw_shop.events WHERE id = 5") == [(0,)]
    assert "raw_shop.events: NOT LOADED: column(s) label no longer in the source table events" in stopped.stdout
    assert "bring the column back" in stopped.stderr and "events is copied whole again" in stopped.stderr
    same_rows(url, warehouse, "ledger", "id, amount, note, currency, rate")
    source.execute("ALTER TABLE events ADD COLUMN label text", "UPDATE events SET label = 'back ' || id")
    assert "events: copied whole from the source (not copied since the slot was created)" in run(env)
    assert_equal(url, warehouse)
    verified = dlt(env, "pipeline", "shop", "verify")  # verify agrees, added and retyped columns included
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_retype_without_a_cast_rebuilds_the_table(setup: tuple[Source, dict[str, str], Warehouse]) -> None:
    """Issue 24: boolean -> smallint and smallint -> boolean (PostgreSQL has no cast between boolean and bigint), on a
    plain and a partitioned table: the table is rebuilt with the new type in the run that finds the change, the rows
    of erased customers leave the warehouse in it, and the stream applies the later changes on top."""
    source, env, warehouse = setup
    url = source.url
    source.execute(
        "ALTER TABLE ledger ADD COLUMN cleared boolean, ADD COLUMN priority smallint, ADD COLUMN ref text",
        "UPDATE ledger SET cleared = id % 2 = 0, priority = id % 3, ref = 'R' || id",
        "ALTER TABLE events ADD COLUMN urgent boolean",
        "UPDATE events SET urgent = id % 2 = 1",
    )
    run(env)  # the initial copy
    if warehouse.target == "postgres":  # as SQLMesh's staging views read the raw tables
        warehouse.query(
            "CREATE SCHEMA staging; CREATE VIEW staging.ledger AS SELECT id, cleared, priority FROM raw_shop.ledger; "
            "CREATE VIEW staging.events AS SELECT id, day, urgent FROM raw_shop.events"
        )
    source.execute(
        "ALTER TABLE ledger ALTER COLUMN cleared TYPE smallint USING cleared::int, "
        "ALTER COLUMN priority TYPE boolean USING priority > 0, ALTER COLUMN ref TYPE integer USING 7 * id",
        "ALTER TABLE events ALTER COLUMN urgent TYPE smallint USING urgent::int",
        "UPDATE ledger SET cleared = 5, note = 'after the retype' WHERE id = 3",
        "DELETE FROM ledger WHERE id IN (7, 8)",  # erased customers' lines
        "DELETE FROM accounts WHERE id IN (2, 3)",
        "INSERT INTO events VALUES (300, '2025-07-01', 'new', 2)",
    )
    changed = run(env)
    assert re.search(
        r"raw_shop\.ledger: column cleared retyped boolean → bigint, column priority retyped bigint → boolean, "
        r"column ref retyped \S+ → bigint, table reloaded \(28 rows, ",
        changed,
        re.I,
    ), changed
    assert re.search(
        r"raw_shop\.events: column urgent retyped boolean → bigint, table reloaded \(11 rows", changed, re.I
    )
    same_rows(url, warehouse, "ledger", "id, amount, note, cleared, priority, ref")
    same_rows(url, warehouse, "events", "id, day, label, urgent")
    assert_equal(url, warehouse)
    if warehouse.target == "postgres":
        assert warehouse.query("SELECT cleared, priority FROM staging.ledger WHERE id = 3") == [(5, False)]

    # the stream goes on over the new types
    source.execute("UPDATE ledger SET priority = false WHERE id = 1", "UPDATE events SET urgent = 9 WHERE id = 300")
    after = run(env)
    assert "reloaded" not in after, after
    same_rows(url, warehouse, "ledger", "id, amount, note, cleared, priority, ref")
    same_rows(url, warehouse, "events", "id, day, label, urgent")
    verified = dlt(env, "pipeline", "shop", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr


DEMO_VARIANT = PROJECT_ROOT / "datamart/demo/pipelines/replication/app_db.yaml"
#: per demo table: the source's query and the warehouse's (personal values treated: see the variant)
DEMO_TABLES = {
    "organizations": "id, name, kind, department, created_at, updated_at, deleted_at",
    "missions": "id, organization_id, title, domain, department, places, status, start_date, created_at, updated_at, "
    "deleted_at",
    "applications": "id, mission_id, volunteer_id, status, created_at, updated_at",
    "stats_events": "id, event_type, partner_id, mission_id, occurred_at",
}


def naive(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Rows comparable across engines: timestamps as naive UTC (PostgreSQL warehouses load timestamptz)."""
    from datetime import UTC, datetime

    def value(v: Any) -> Any:
        return v.astimezone(UTC).replace(tzinfo=None) if isinstance(v, datetime) and v.tzinfo else v

    return normal([tuple(value(v) for v in row) for row in rows])


@pytest.mark.parametrize("target", ["duckdb", "postgres"])
def test_demo_runs_in_replication_mode(logical: ThrowawayPostgres, tmp_path: Path, target: str) -> None:
    """The demo generated into a PostgreSQL source, read by the documented variant of app_db (`changes:
    replication`): the copy, then a demo day's changes; the warehouse equals the source, table by table."""
    url = create_database(logical.url(), f"demo_{uuid.uuid4().hex[:8]}")
    if target == "duckdb":
        warehouse = Warehouse(target="duckdb", duckdb_path=tmp_path / "warehouse.duckdb")
    else:
        warehouse = postgres_warehouse(create_database(logical.url(), f"wh_{uuid.uuid4().hex[:8]}"))
    declaration = yaml.safe_load(DEMO_VARIANT.read_text())
    declaration["source"]["slot"] = f"datamart_app_db_{target}"  # slots are the cluster's, not a database's
    (tmp_path / "declarations").mkdir()
    (tmp_path / "declarations" / "app_db.yaml").write_text(
        yaml.safe_dump(declaration, sort_keys=False), encoding="utf-8"
    )
    env = environment(tmp_path, url, warehouse)
    env["SOURCES__APP_DB__CREDENTIALS"] = url

    def demo(*args: str) -> None:
        command = [sys.executable, "-m", "datamart.demo", "--source-url", url, "--bucket", str(tmp_path / "bucket")]
        result = subprocess.run([*command, *args], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr

    def pipeline_run() -> str:
        result = dlt(env, "pipeline", "app_db", "run")
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def assert_demo_equal() -> None:
        for table, columns in DEMO_TABLES.items():
            wanted = naive(source_rows(url, f"SELECT {columns} FROM {table}"))
            current = " WHERE _dlt_valid_to IS NULL" if table == "missions" else ""  # history: scd2
            assert naive(warehouse.query(f"SELECT {columns} FROM raw_app_db.{table}{current}")) == wanted, table
        people = source_rows(url, "SELECT id, email, extract(year FROM birth_date)::int, department FROM volunteers")
        wanted = [(i, pseudonym(KEY.encode(), e), y, d) for i, e, y, d in people]
        got = warehouse.query("SELECT id, email, birth_year, department FROM raw_app_db.volunteers")
        assert naive(got) == naive(wanted)

    demo("--scale", "0.2")
    assert "initial copy of organizations, missions, volunteers, applications, stats_events" in pipeline_run()
    assert_demo_equal()
    demo("--advance-day")  # a demo day: inserts, updates, soft and hard deletes
    changed = pipeline_run()
    assert counts_of(changed, "raw_app_db.applications")[3] > 0  # hard-deleted applications, applied by key
    assert_demo_equal()


def counts_of(summary: str, table: str) -> tuple[int, ...]:
    """read, inserted, updated, deleted, in warehouse: the summary line of ``table``."""
    line = next(line for line in summary.splitlines() if line.startswith(f"{table} "))
    return tuple(int(n.replace(",", "")) for n in re.findall(r"[\d,]+", line.split(maxsplit=1)[1]))
