"""Replication mode's ways out, through the commands a user types: one table copied again while the slot serves the
others (`run --table t --full-refresh`, `verify --repair --table t`, `drop t` then `run`), a column classified after
being held back, and a slot the source invalidated or that vanished. After every step the warehouse equals the source
row for row (personal values treated).

One throwaway cluster with wal_level=logical for the module; each test has its own source database, warehouse and
slot. Source tables as applications have them: an enum, booleans, a partitioned table with a composite key.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
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
KEY = "replication-recovery-key"

pytestmark = pytest.mark.postgres

SCHEMA = [
    "CREATE TYPE kind AS ENUM ('person', 'company', 'association')",
    "CREATE TABLE accounts (id int PRIMARY KEY, name text, email text, birth_date date, kind kind, active boolean)",
    "CREATE TABLE ledger (id int PRIMARY KEY, amount numeric(10,2), paid boolean, note text)",
    "CREATE TABLE events (id int, day date, kind kind, seen boolean, label text, PRIMARY KEY (id, day)) "
    "PARTITION BY RANGE (day)",
    "CREATE TABLE events_2024 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')",
    "CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')",
    "INSERT INTO accounts SELECT i, 'name ' || i, 'person' || i || '@example.org', date '1980-01-01' + i * 400, "
    "(enum_range(NULL::kind))[1 + i % 3], i % 2 = 0 FROM generate_series(1, 20) i",
    "INSERT INTO ledger SELECT i, i * 1.25, i % 3 = 0, 'line ' || i FROM generate_series(1, 30) i",
    "INSERT INTO events SELECT i, date '2024-06-01' + i * 20, (enum_range(NULL::kind))[1 + i % 3], i % 2 = 1, "
    "'event ' || i FROM generate_series(1, 20) i",
]

TABLES = {  # the columns compared as they are, per table (accounts: see assert_equal)
    "ledger": "id, amount, paid, note",
    "events": "id, day, kind::text, seen, label",
}


def declaration(slot: str, **personal: str) -> dict[str, Any]:
    return {
        "name": "shop",
        "source": {"kind": "sql_database", "changes": "replication", "slot": slot},
        "dataset": "raw_shop",
        "tables": {
            "accounts": {
                "write_disposition": "merge",
                "primary_key": "id",
                "personal": {"email": "hash", "birth_date": "year", **personal},
            },
            "ledger": {"write_disposition": "merge", "primary_key": "id"},
            "events": {"write_disposition": "merge", "primary_key": ["id", "day"]},  # partitioned by day
        },
    }


class Shop:
    """One test's source, warehouse, declaration folder and the environment its commands run with."""

    def __init__(self, server: ThrowawayPostgres, tmp_path: Path, target: str) -> None:
        self.server = server
        self.url = create_database(server.url(), f"src_{uuid.uuid4().hex[:8]}")
        self.source = Source(self.url)
        self.source.execute(*SCHEMA)
        if target == "duckdb":
            self.warehouse = Warehouse(target="duckdb", duckdb_path=tmp_path / "warehouse.duckdb")
        else:
            self.warehouse = postgres_warehouse(create_database(server.url(), f"wh_{uuid.uuid4().hex[:8]}"))
        self.slot = f"datamart_recovery_{uuid.uuid4().hex[:8]}"  # slots are the cluster's: one per test
        self.folder = tmp_path / "declarations"
        self.declare()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("DESTINATION__", "SOURCES__", "DATAMART"))}
        self.env.update(
            SOURCES__SHOP__CREDENTIALS=self.url,
            DATAMART__PII_HMAC_KEY=KEY,
            DATAMART_PIPELINES_DIR=str(tmp_path / "pipelines"),
            DATAMART_DECLARATIONS_DIR=str(self.folder),
            **self.warehouse.environment_variables(),
        )

    def declare(self, **personal: str) -> None:
        self.folder.mkdir(exist_ok=True)
        text = yaml.safe_dump(declaration(self.slot, **personal), sort_keys=False)
        (self.folder / "shop.yaml").write_text(text, encoding="utf-8")

    def command(self, *args: str, expect: int = 0, **extra: str) -> str:
        """``args`` as typed (``dlt …`` or ``python -m datamart …``), its exit code checked; stdout and stderr."""
        program = [DLT] if args[0] != "datamart" else [sys.executable, "-m"]
        result = subprocess.run(
            [*program, *args],
            env={**self.env, **extra},
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        output = result.stdout + result.stderr
        assert result.returncode == expect, f"{' '.join(args)}: exit {result.returncode}\n{output}"
        return output

    def run(self, *args: str, expect: int = 0, **extra: str) -> str:
        return self.command("pipeline", "shop", "run", *args, expect=expect, **extra)

    def slot_status(self) -> list[tuple[Any, ...]]:
        return self.source.query(f"SELECT wal_status FROM pg_replication_slots WHERE slot_name = '{self.slot}'")

    def drop_slot(self) -> None:
        self.source.execute(
            f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{self.slot}'"
        )

    def assert_equal(self, *phone: str) -> None:
        """Every table of the warehouse equals the source's, row for row; personal values treated, never in clear
        (``phone``: accounts columns classified later, ``phone`` hashed)."""
        key = KEY.encode()
        extra = "".join(f", {c}::text" if c == "segment" else f", {c}" for c in phone)
        source = source_rows(
            self.url,
            f"SELECT id, name, email, extract(year FROM birth_date)::int, kind::text, active{extra} FROM accounts",
        )
        expected = [
            (
                i,
                n,
                pseudonym(key, e),
                y,
                k,
                a,
                *(pseudonym(key, v) if v and c == "phone" else v for c, v in zip(phone, rest, strict=True)),
            )
            for i, n, e, y, k, a, *rest in source
        ]
        extra = extra.replace("::text", "")
        loaded = self.warehouse.query(f"SELECT id, name, email, birth_year, kind, active{extra} FROM raw_shop.accounts")
        assert normal(loaded) == normal(expected), "accounts"
        for table, columns in TABLES.items():
            wanted = normal(source_rows(self.url, f"SELECT {columns} FROM {table}"))
            got = normal(self.warehouse.query(f"SELECT {columns.replace('::text', '')} FROM raw_shop.{table}"))
            assert got == wanted, table


def normal(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Rows comparable across engines: decimals by value."""
    return sorted(tuple(float(v) if isinstance(v, Decimal) else v for v in row) for row in rows)


@pytest.fixture
def shop(logical: ThrowawayPostgres, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Shop]:
    made = Shop(logical, tmp_path, getattr(request, "param", "postgres"))
    yield made
    made.drop_slot()


def tamper(warehouse: Warehouse, *statements: str) -> None:
    """Change the warehouse behind the pipeline's back (a restore, a hand-made fix gone wrong)."""
    with warehouse.transaction() as cur:
        for statement in statements:
            cur.execute(statement)


def change_everything(source: Source, step: int) -> None:
    """Inserts, updates (an enum, a boolean, a row moved to the other partition) and deletes in every table."""
    source.execute(
        f"INSERT INTO accounts VALUES ({100 + step}, 'new {step}', 'new{step}@example.org', '1999-05-05', "
        "'company', true)",
        f"UPDATE accounts SET kind = 'association', active = NOT active WHERE id = {step}",
        f"DELETE FROM accounts WHERE id = {10 + step}",
        f"UPDATE ledger SET amount = amount + 100, paid = NOT paid WHERE id IN ({step}, {step + 1})",
        f"DELETE FROM ledger WHERE id = {20 + step}",
        f"INSERT INTO ledger VALUES ({100 + step}, 9.99, false, 'late {step}')",
        f"UPDATE events SET day = day - 200, seen = NOT seen WHERE id = {step + 10}",  # may cross partitions
        f"DELETE FROM events WHERE id = {step}",
        f"INSERT INTO events VALUES ({100 + step}, '2025-03-0{step}', 'person', true, 'new {step}')",
    )


@pytest.mark.parametrize("shop", ["postgres", "duckdb"], indirect=True)
def test_one_table_copied_again_while_the_slot_serves_the_others(shop: Shop) -> None:
    """`run --table t --full-refresh`, `verify --repair --table t` and `drop t` then `run` each copy that one table
    again from the source, while the other tables' changes are applied from the slot in the same run."""
    shop.run()  # the publication, the slot, the initial copy
    shop.assert_equal()

    # a refresh of one table: copied whole (a row the warehouse holds that the source never had goes), the others'
    # changes applied from the slot in the same run
    change_everything(shop.source, 1)
    tamper(shop.warehouse, "UPDATE raw_shop.events SET label = 'drifted' WHERE id = 3")
    refreshed = shop.run("--table", "events", "--full-refresh")
    assert "events: copied whole from the source (--full-refresh)" in refreshed, refreshed
    shop.assert_equal()

    # drop t, then run: the table the declaration names and the warehouse lacks is copied again, with a line saying so
    change_everything(shop.source, 2)
    shop.command("-y", "pipeline", "shop", "drop", "ledger")
    dropped = shop.run()
    assert "ledger: copied whole from the source (not in the warehouse)" in dropped, dropped
    shop.assert_equal()

    # verify --repair --table t: the drifted table is copied again, the others are not touched
    change_everything(shop.source, 3)
    tamper(shop.warehouse, "DELETE FROM raw_shop.ledger WHERE id < 5", "UPDATE raw_shop.ledger SET note = 'x'")
    shop.command("-y", "pipeline", "shop", "drop", "events")
    shop.command("pipeline", "shop", "verify", "--repair", "--table", "ledger")
    shop.command("pipeline", "shop", "verify", "--repair", "--table", "events")
    # the slot still holds every change since the last run: the next run applies them on top of the copies
    change_everything(shop.source, 4)
    shop.run()
    shop.assert_equal()

    # verify names a dropped table with the command that loads it again: that command, exactly as printed
    change_everything(shop.source, 5)
    shop.command("-y", "pipeline", "shop", "drop", "events")
    report = shop.command("pipeline", "shop", "verify", expect=1)
    fix = re.search(r"table events: fix with `(dlt pipeline shop run --table events)`", report)
    assert fix, report
    again = shop.command(*fix.group(1).split()[1:])
    assert "events: copied whole from the source (not in the warehouse)" in again, again
    shop.assert_equal()
    shop.command("pipeline", "shop", "verify")


def test_classified_columns_load_on_the_next_run(shop: Shop) -> None:
    """New columns of a personal table are held back until classified; the next run loads them, treated."""
    shop.run()
    shop.source.execute(
        "ALTER TABLE accounts ADD COLUMN phone text, ADD COLUMN vip boolean, ADD COLUMN segment kind",
        "UPDATE accounts SET phone = '06' || id, vip = id % 4 = 0, segment = 'company' WHERE id < 15",
    )
    held = shop.run()
    assert "new column(s) phone, vip, segment NOT loaded" in held, held
    shop.assert_equal()
    shop.declare(phone="hash", vip="keep", segment="keep")
    shop.source.execute("UPDATE accounts SET name = 'changed' WHERE id = 3")
    loaded = shop.run()
    assert "accounts: copied whole from the source (column(s) phone, vip, segment classified)" in loaded, loaded
    shop.assert_equal("phone", "vip", "segment")
    change_everything(shop.source, 1)
    shop.run()
    shop.assert_equal("phone", "vip", "segment")

    # --full-refresh without --table: every table copied again, within the batch
    change_everything(shop.source, 2)
    refreshed = shop.run("--full-refresh")
    for table in ("accounts", "ledger", "events"):
        assert f"{table}: copied whole from the source (--full-refresh)" in refreshed, refreshed
    shop.assert_equal("phone", "vip", "segment")
    shop.command("pipeline", "shop", "verify")


def autocommit(source: Source, *statements: str) -> None:
    """Statements PostgreSQL refuses inside a transaction block (ALTER SYSTEM), each on its own."""
    import psycopg2

    conn = psycopg2.connect(source.url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()


def invalidate(shop: Shop) -> None:
    """Make the source invalidate the slot: max_slot_wal_keep_size 1MB, then WAL written past it and a checkpoint."""
    admin = Source(shop.server.url())
    autocommit(admin, "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'", "SELECT pg_reload_conf()")
    try:
        for _ in range(6):
            if shop.slot_status() == [("lost",)]:
                break
            admin.execute(
                "CREATE TABLE IF NOT EXISTS filler (n int)", "INSERT INTO filler SELECT generate_series(1, 30000)"
            )
            autocommit(admin, "SELECT pg_switch_wal()", "CHECKPOINT")
    finally:
        autocommit(admin, "ALTER SYSTEM RESET max_slot_wal_keep_size", "SELECT pg_reload_conf()")
    assert shop.slot_status() == [("lost",)]


def test_lost_or_vanished_slot_is_recovered_and_alerted(shop: Shop, webhook: tuple[str, list[str]]) -> None:
    """A slot the source invalidated (wal_status lost) or that was dropped: the run names it, copies every table
    again (deleted rows go too) with a new slot, and the scheduled run alerts."""
    url, posted = webhook
    shop.run()
    change_everything(shop.source, 1)
    shop.run()
    shop.assert_equal()

    change_everything(shop.source, 2)  # changes the lost slot will never deliver, deletes among them
    invalidate(shop)
    # the slot check alone (no run since the source invalidated the slot) names it and the command that recovers
    checked = shop.command(
        "datamart", "scheduled", "--only", "replication_slots", expect=1, DATAMART__ALERT_WEBHOOK_URL=url
    )
    assert f"slot '{shop.slot}' was invalidated by the source (wal_status lost" in checked, checked
    assert "`dlt pipeline shop run`: it creates a new slot and copies every table whole again" in posted[-1]
    before = len(posted)
    scheduled = shop.command(
        "datamart", "scheduled", "--only", "pipelines", "--only", "replication_slots",
        expect=1, DATAMART__ALERT_WEBHOOK_URL=url,
    )  # fmt: skip
    lost = f"slot '{shop.slot}' was invalidated by the source"
    assert lost in scheduled, scheduled
    assert len(posted) == before + 1
    alert = json.loads(posted[-1])["text"]
    assert lost in alert and "every table was copied whole again" in alert, alert
    assert shop.slot_status() == [("reserved",)]
    shop.assert_equal()

    change_everything(shop.source, 3)
    shop.run()
    shop.assert_equal()

    # dropped between runs (by a DBA, a failover to a replica without it): named, recovered the same way
    change_everything(shop.source, 4)
    shop.drop_slot()
    vanished = shop.run()
    assert f"slot '{shop.slot}' was not on the source" in vanished, vanished
    shop.assert_equal()

    # dropped while a run reads it: that run stops, naming the slot and the command that recovers
    change_everything(shop.source, 5)
    failed = shop.run(expect=1, DATAMART_TEST_REPLICATION_FAIL="drop-slot")
    assert f"slot '{shop.slot}' was dropped while this run read it" in failed, failed
    assert "what to do: rerun `dlt pipeline shop run`: it creates a new slot and copies every table whole" in failed
    assert "every table was copied whole again" in shop.run()
    shop.assert_equal()
    shop.command("pipeline", "shop", "verify")
