"""``verify --repair`` against a PostgreSQL source, on DuckDB and PostgreSQL warehouses: what a cursor cannot see
(amounts corrected without a timestamp, a backdated insert, a late commit, a deleted row) is reloaded by key range,
and only there; personal columns are treated as in a run; dlt's cursor stays where it was."""

from __future__ import annotations

import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from datamart.ingest.declarations import load_declaration
from datamart.ingest.personal import pseudonym
from datamart.ingest.repair import repair_pipeline
from datamart.ingest.verify import state_cursor, stored_state, verify_pipeline
from datamart.settings import PROJECT_ROOT, Warehouse, postgres_warehouse
from datamart.testing.sources import Source, source_rows

pytestmark = pytest.mark.postgres

DLT = str(Path(sys.executable).parent / "dlt")
KEY = "repair-test-key"
SCHEMA = """
CREATE TABLE payments (
    id integer PRIMARY KEY, payer_email text, payer_name text, payer_birth_date date, amount numeric(10, 2),
    paid_on date
);
CREATE TABLE orders (id integer PRIMARY KEY, status text, total numeric(10, 2), updated_at timestamp NOT NULL);
INSERT INTO payments
SELECT i, 'payer' || i || '@example.org', 'Name ' || i, date '1980-01-01' + i * 40, i * 1.5, date '2026-01-01' + i % 30
FROM generate_series(1, 200) AS i;
INSERT INTO orders
SELECT i, 'open', i * 2.25, timestamp '2026-01-01 00:00:00' + i * interval '1 minute' FROM generate_series(1, 200) AS i;
"""
DECLARATION = """\
name: repair_app
source: {kind: sql_database}
dataset: raw_repair_app
verify: repair
tables:
  payments:              # no update timestamp: amounts are corrected in place, the cursor never sees it
    write_disposition: append
    primary_key: id
    cursor: id
    personal: {payer_email: hash, payer_name: drop, payer_birth_date: year}
  orders:
    write_disposition: merge
    primary_key: id
    cursor: updated_at
    deletes: {hard: key_set}
"""


def _env(warehouse: Warehouse, source: Source, folder: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DESTINATION__", "SOURCES__", "DATAMART_TARGET"))}
    env.update(
        SOURCES__REPAIR_APP__CREDENTIALS=source.url,
        DATAMART__PII_HMAC_KEY=KEY,
        DATAMART_DECLARATIONS_DIR=str(folder / "declarations"),
        DATAMART_PIPELINES_DIR=str(folder / "pipelines"),
    )
    env.update(warehouse.environment_variables())
    return env


def _run(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def _setup(warehouse: Warehouse, source: Source, folder: Path) -> dict[str, str]:
    source.execute(SCHEMA)
    (folder / "declarations").mkdir(parents=True)
    (folder / "declarations" / "repair_app.yaml").write_text(DECLARATION)
    return _env(warehouse, source, folder)


def _assert_equal_to_source(warehouse: Warehouse, source: Source) -> None:
    """Compare, don't count: every non-personal value row for row, and the personal ones as a run treats them."""
    payments = warehouse.query(
        "SELECT id, payer_email, payer_birth_year, amount, paid_on FROM raw_repair_app.payments ORDER BY id"
    )
    expected = [
        (i, pseudonym(KEY.encode(), email), birth.year, amount, paid)
        for i, email, birth, amount, paid in source_rows(
            source.url, "SELECT id, payer_email, payer_birth_date, amount, paid_on FROM payments ORDER BY id"
        )
    ]
    assert [(*r[:3], Decimal(r[3]), r[4]) for r in payments] == expected
    assert "payer_name" not in warehouse.columns("raw_repair_app", "payments")
    assert "payer_birth_date" not in warehouse.columns("raw_repair_app", "payments")
    orders = warehouse.query("SELECT id, status, total, updated_at FROM raw_repair_app.orders ORDER BY id")
    assert [(r[0], r[1], Decimal(r[2]), r[3]) for r in orders] == source_rows(
        source.url, "SELECT id, status, total, updated_at FROM orders ORDER BY id"
    )


def _load_ids(warehouse: Warehouse, table: str) -> dict[int, str]:
    return dict(warehouse.query(f"SELECT id, _dlt_load_id FROM raw_repair_app.{table}"))


@pytest.fixture(params=["duckdb", "postgres"])
def repair_warehouse(request: pytest.FixtureRequest, tmp_path: Path, pg_database_factory: Any) -> Warehouse:
    if request.param == "duckdb":
        return Warehouse(target="duckdb", duckdb_path=tmp_path / "warehouse.duckdb")
    return postgres_warehouse(pg_database_factory("warehouse"))


def test_repair_reloads_only_the_differing_key_ranges(
    repair_warehouse: Warehouse, pg_database_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    warehouse = repair_warehouse
    source = Source(pg_database_factory("source"))
    env = _setup(warehouse, source, tmp_path)
    _run(env, DLT, "pipeline", "repair_app", "run")

    # What a cursor cannot see. Amounts corrected without a timestamp (10-12: one range, 150: another) …
    source.execute("UPDATE payments SET amount = amount + 100 WHERE id IN (10, 11, 12, 150)")
    source.execute("INSERT INTO payments VALUES (201, 'new@example.org', 'New', '1990-05-05', 7.5, '2026-02-01')")
    # … a backdated insert (its cursor below the high-water mark) …
    source.execute("INSERT INTO orders VALUES (500, 'open', 1.00, '2025-12-31 00:00:00')")
    # … and a late commit: stamped before the run read the table, committed after it (the run reads order 7's
    # later stamp, so its cursor passes the late row's)
    late = psycopg2.connect(source.url)
    try:
        with late.cursor() as cur:
            cur.execute("INSERT INTO orders VALUES (600, 'open', 6.00, '2026-01-02 00:00:00')")
        source.execute("UPDATE orders SET status = 'paid', updated_at = '2026-01-03 00:00:00' WHERE id = 7")
        run = _run(env, DLT, "pipeline", "repair_app", "run")
        late.commit()
    finally:
        late.close()
    assert "raw_repair_app.payments" in run.stdout
    source.execute("DELETE FROM orders WHERE id = 100")  # deleted after the run: key-set detection has not seen it

    monkeypatch.setenv("SOURCES__REPAIR_APP__CREDENTIALS", source.url)
    monkeypatch.setenv("DATAMART__PII_HMAC_KEY", KEY)
    decl = load_declaration(tmp_path / "declarations" / "repair_app.yaml")
    state_before = stored_state(warehouse, decl)
    cursors = {t.name: state_cursor(state_before, decl, t) for t in decl.tables}
    before = {t: _load_ids(warehouse, t) for t in ("payments", "orders")}

    repaired = _run(env, DLT, "pipeline", "repair_app", "verify", "--repair")

    out = repaired.stdout
    # the first verify located the drift, named the differing column (never a value)
    assert "raw_repair_app.payments: columns that differ: amount (4 rows)" in out, out
    assert "example.org" not in out and "Name " not in out
    assert "raw_repair_app.orders: 2 key(s) missing from the warehouse, e.g. 500, 600" in out
    assert "repair_app: after repair, equal to the source" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.endswith("reloaded")}
    assert lines["payments"][1:4] == ["2", "4", "0"], out  # two key ranges, four rows rewritten, none deleted
    assert lines["orders"][1:4] == ["2", "2", "1"], out  # 100 (deleted), 500 … 600 (inserted)
    _assert_equal_to_source(warehouse, source)
    # only the differing rows were rewritten: every other row keeps its load id
    after = {t: _load_ids(warehouse, t) for t in ("payments", "orders")}
    changed = {t: sorted(k for k in after[t] if after[t][k] != before[t].get(k)) for t in after}
    assert changed == {"payments": [10, 11, 12, 150], "orders": [500, 600]}
    # dlt's cursor did not move: the next run continues where the last one stopped
    state_after = stored_state(warehouse, decl)
    assert {t.name: state_cursor(state_after, decl, t) for t in decl.tables} == cursors

    # A normal run afterwards loads nothing again, and the warehouse still equals the source.
    again = _run(env, DLT, "pipeline", "repair_app", "run")
    assert {t: _load_ids(warehouse, t) for t in ("payments", "orders")} == after, again.stdout
    assert not verify_pipeline(decl, warehouse).drift

    # A source column the warehouse never got (added with a default: no row's cursor moved) is drift, named;
    # the repair reloads that table whole, the column with it.
    source.execute("ALTER TABLE orders ADD COLUMN channel text DEFAULT 'web'")
    report = verify_pipeline(decl, warehouse)
    orders = {t.table: t for t in report.tables}["orders"]
    assert report.drift and orders.missing_columns == ("channel",)
    assert "raw_repair_app.orders: source column(s) not in the warehouse: channel" in report.format()
    fixed = repair_pipeline(decl, warehouse, pipelines_dir=tmp_path / "pipelines")
    assert not fixed.drift, fixed.format()
    assert warehouse.query("SELECT DISTINCT channel FROM raw_repair_app.orders") == [("web",)]


def test_a_scheduled_run_repairs_a_pipeline_declaring_verify_repair(pg_database_factory: Any, tmp_path: Path) -> None:
    warehouse = Warehouse(target="duckdb", duckdb_path=tmp_path / "warehouse.duckdb")
    source = Source(pg_database_factory("source"))
    env = _setup(warehouse, source, tmp_path)
    _run(env, DLT, "pipeline", "repair_app", "run")
    source.execute("UPDATE payments SET amount = 0 WHERE id = 42")  # no timestamp: the run cannot see it
    scheduled = [sys.executable, "-m", "datamart", "scheduled", "--only", "pipelines", "--only", "repair"]
    result = _run(env, *scheduled, "--no-alert")
    assert "ok      repair repair_app       repaired payments (1 rows rewritten, 0 deleted)" in result.stdout, (
        result.stdout
    )
    _assert_equal_to_source(warehouse, source)

    # Drift the repair cannot reload (a table declared since, never loaded): the step fails, exit 1, with the fix.
    source.execute(
        "CREATE TABLE refunds (id integer PRIMARY KEY, amount numeric(10, 2))", "INSERT INTO refunds VALUES (1, 2)"
    )
    declaration = tmp_path / "declarations" / "repair_app.yaml"
    declaration.write_text(declaration.read_text() + "  refunds: {write_disposition: merge, primary_key: id}\n")
    failed = _run(env, sys.executable, "-m", "datamart", "scheduled", "--only", "repair", "--no-alert", check=False)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert (
        "refunds" in failed.stdout
        and "NOT REPAIRED: never loaded; run `dlt pipeline repair_app run --table refunds`" in (failed.stdout)
    )
    assert "FAILED  repair repair_app       the warehouse still differs from the source in refunds" in failed.stdout
    assert "result: FAILED" in failed.stdout


def test_verify_repair_is_a_declared_value_and_a_typo_is_refused(tmp_path: Path) -> None:
    from datamart.ingest.declarations import DeclarationError

    path = tmp_path / "repair_app.yaml"
    path.write_text(DECLARATION)
    decl = load_declaration(path)
    assert (decl.verify, decl.repair) == (True, True)
    path.write_text(DECLARATION.replace("verify: repair", "verify: repiar"))
    with pytest.raises(DeclarationError, match=r"repair_app.yaml: verify: 'repiar' \(did you mean 'repair'\?\)"):
        load_declaration(path)
