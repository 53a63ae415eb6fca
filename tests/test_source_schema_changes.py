"""Issue 15, schema evolution that never blocks the other tables: against a PostgreSQL source nobody here designed
(an enum, a domain, an array, a tsvector, a partitioned table), a column added with a default, a column added with
no row touched and a type change are applied in the run that finds them (the table reloaded whole), while the other
tables load their ordinary changes; `dlt pipeline <name> run` exits 0 and says what changed and what it cost. Then
every table equals the source, and the next run reads only what changed after (the cursors were not disturbed).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from datamart.settings import Warehouse
from datamart.testing.commands import dlt, environment
from datamart.testing.sources import Source, source_rows

pytestmark = pytest.mark.postgres


SCHEMA = """
CREATE TYPE doc_status AS ENUM ('draft', 'published', 'archived');
CREATE DOMAIN positive_int AS integer CHECK (VALUE > 0);
CREATE TABLE documents (
    id integer PRIMARY KEY, title text NOT NULL, search tsvector, tags text[], status doc_status,
    pages positive_int, code char(4), updated_at timestamptz NOT NULL
);
INSERT INTO documents
SELECT i, 'Document ' || i, to_tsvector('simple', 'mission numéro ' || i), ARRAY['tag' || (i % 3), 'all'],
       (ARRAY['draft', 'published', 'archived']::doc_status[])[1 + i % 3], 1 + i % 40, 'C' || (i % 10),
       timestamptz '2026-01-01 00:00:00+00' + i * interval '1 minute'
FROM generate_series(1, 300) AS i;
CREATE TABLE visits (id bigint, visited_on date, page text, PRIMARY KEY (id, visited_on))
PARTITION BY RANGE (visited_on);
CREATE TABLE visits_2025 PARTITION OF visits FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE visits_2026 PARTITION OF visits FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
INSERT INTO visits SELECT i, date '2025-12-20' + (i % 30), '/page/' || (i % 7) FROM generate_series(1, 500) AS i;
CREATE TABLE payments (id integer PRIMARY KEY, amount integer NOT NULL, label integer, updated_at timestamptz NOT NULL);
INSERT INTO payments SELECT i, i * 10, i, timestamptz '2026-01-01 00:00:00+00' + i * interval '1 hour'
FROM generate_series(1, 40) AS i;
CREATE TABLE people (id integer PRIMARY KEY, email text, city text, updated_at timestamptz NOT NULL);
INSERT INTO people SELECT i, 'p' || i || '@example.org', 'City ' || (i % 4),
       timestamptz '2026-01-01 00:00:00+00' + i * interval '1 hour'
FROM generate_series(1, 20) AS i;
"""

DECLARATION = """\
name: evolving
source:
  kind: sql_database
dataset: raw_evolving
tables:
  documents:
    write_disposition: merge
    primary_key: id
    cursor: updated_at
  visits:                 # partitioned, insert-only
    write_disposition: append
    primary_key: [id, visited_on]
    cursor: id
  payments:
    write_disposition: merge
    primary_key: id
    cursor: updated_at
    deletes: {hard: key_set}
  people:
    write_disposition: merge
    primary_key: id
    cursor: updated_at
    personal: {email: hash}
"""

#: what the warehouse must hold, per table, read from the source (the e-mails are hashed: compared by presence)
SOURCE_QUERIES = {
    "documents": "SELECT id, title, search::text, tags, status::text, pages, code, updated_at{extra} FROM documents",
    "visits": "SELECT id, visited_on, page{extra} FROM visits",
    "payments": "SELECT id, amount, label, updated_at FROM payments",
    "people": "SELECT id, email IS NOT NULL, city, updated_at FROM people",
}
WAREHOUSE_QUERIES = {
    "documents": "SELECT id, title, search, tags, status, pages, code, updated_at{extra} FROM raw_evolving.documents",
    "visits": "SELECT id, visited_on, page{extra} FROM raw_evolving.visits",
    "payments": "SELECT id, amount, label, updated_at FROM raw_evolving.payments",
    "people": "SELECT id, email IS NOT NULL, city, updated_at FROM raw_evolving.people",
}


def normalised(rows: list[tuple]) -> list[tuple]:
    """Arrays arrive as JSON (a list in PostgreSQL's driver, a string in DuckDB's), numbers compare by value."""
    out = []
    for row in rows:
        values = []
        for value in row:
            if isinstance(value, str) and value.startswith("["):
                value = json.loads(value)
            values.append(float(value) if type(value).__name__ == "Decimal" else value)
        out.append(tuple(values))
    return out


def assert_equal_to_source(warehouse: Warehouse, url: str, extra: dict[str, str]) -> None:
    """Compare, don't count: every non-personal value of every table, row for row."""
    for table, statement in SOURCE_QUERIES.items():
        added = extra.get(table, "")
        want = source_rows(url, statement.format(extra=added) + " ORDER BY 1, 2")
        got = warehouse.query(WAREHOUSE_QUERIES[table].format(extra=added) + " ORDER BY 1, 2")
        assert normalised(got) == normalised(want), table


def command_env(warehouse: Warehouse, tmp_path: Path, source_url: str) -> dict[str, str]:
    declarations = tmp_path / "declarations"
    declarations.mkdir()
    (declarations / "evolving.yaml").write_text(DECLARATION)
    return environment(
        DATAMART__PII_HMAC_KEY="evolution-test-key",
        DATAMART_PIPELINES_DIR=str(tmp_path / "pipelines"),
        DATAMART_DECLARATIONS_DIR=str(declarations),
        SOURCES__EVOLVING__CREDENTIALS=source_url,
        **warehouse.environment_variables(),
    )


def run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = dlt(env, "pipeline", "evolving", "run")
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def table_row(stdout: str, table: str) -> list[str]:
    """The summary's row of ``table``: read, inserted, updated, deleted, in warehouse."""
    line = next(line for line in stdout.splitlines() if line.startswith(f"raw_evolving.{table} "))
    return line.split()[1:]


def test_added_and_retyped_columns_are_applied_while_the_other_tables_load(
    warehouse: Warehouse, pg_database_factory, tmp_path: Path
) -> None:
    source = Source(pg_database_factory("source"))
    source.execute(SCHEMA)
    env = command_env(warehouse, tmp_path, source.url)
    run(env)
    assert_equal_to_source(warehouse, source.url, {})
    if warehouse.target == "postgres":  # as SQLMesh's staging views do: views read the raw tables, and views them
        warehouse.query(
            "CREATE SCHEMA staging; "
            "CREATE VIEW staging.payments AS SELECT id, amount, label FROM raw_evolving.payments; "
            "CREATE VIEW staging.documents AS SELECT * FROM raw_evolving.documents; "
            "CREATE VIEW staging.big_payments AS SELECT id, amount FROM staging.payments WHERE amount > 100; "
            "GRANT SELECT ON staging.payments TO PUBLIC; COMMENT ON VIEW staging.payments IS 'payments, staged'"
        )

    source.execute(
        # added with a default, no row touched (PostgreSQL rewrites no row: no cursor moves)
        "ALTER TABLE documents ADD COLUMN region text DEFAULT 'north'",
        # and one with no value anywhere yet, of a type dlt learns from values: not reloaded for at every run
        "ALTER TABLE documents ADD COLUMN summary tsvector",
        # added with no default and no row touched, on a partitioned insert-only table; and new rows
        "ALTER TABLE visits ADD COLUMN referrer text",
        "INSERT INTO visits SELECT i, date '2026-01-05', '/new', 'search' FROM generate_series(501, 510) AS i",
        # retyped: integer -> numeric and integer -> text; some rows change, one is deleted (key-set deletes)
        "ALTER TABLE payments ALTER COLUMN amount TYPE numeric(12, 2), ALTER COLUMN label TYPE text",
        "UPDATE payments SET amount = amount + 0.25, label = 'L' || label, updated_at = updated_at + interval '1 year' "
        "WHERE id <= 3",
        "DELETE FROM payments WHERE id = 40",
        # ordinary updates, and a column nobody classified yet in a table with personal data: held back
        "ALTER TABLE people ADD COLUMN phone text DEFAULT '0600000000'",
        "UPDATE people SET city = 'Moved', updated_at = updated_at + interval '1 year' WHERE id IN (2, 4)",
    )
    second = run(env)
    out = second.stdout
    assert re.search(r"raw_evolving\.documents: column region added, table reloaded \(300 rows, [\d.]+ s\)", out), out
    assert re.search(r"raw_evolving\.visits: column referrer added, table reloaded \(510 rows, [\d.]+ s\)", out), out
    retyped = re.search(
        r"raw_evolving\.payments: column amount retyped (\S+) → (\S+), column label retyped (\S+) → (\S+), "
        r"table reloaded \(39 rows, [\d.]+ s\)",
        out,
    )
    assert retyped, out
    assert retyped.group(1).lower() == retyped.group(3).lower() == "bigint"
    assert retyped.group(2).lower().startswith(("numeric", "decimal")) and retyped.group(4).lower() in (
        "text",
        "varchar",
    )
    assert "raw_evolving.people: new column(s) phone NOT loaded: the table holds personal data" in out
    assert "people: column" not in out  # no reload for a held-back column
    assert table_row(out, "people")[:3] == ["2", "0", "2"]  # read, inserted, updated: its ordinary changes
    assert table_row(out, "documents") == ["300", "0", "300", "0", "300"]
    assert table_row(out, "payments")[-2:] == ["1", "39"]  # the deleted payment is gone
    assert "phone" not in warehouse.columns("raw_evolving", "people")
    assert warehouse.query("SELECT count(*), min(region), max(region) FROM raw_evolving.documents") == [
        (300, "north", "north")
    ]
    assert warehouse.query("SELECT count(*), count(referrer) FROM raw_evolving.visits") == [(510, 10)]
    assert_equal_to_source(warehouse, source.url, {"documents": ", region", "visits": ", referrer"})
    if warehouse.target == "postgres":  # the views still read the table, with the new type, grant and comment kept
        assert warehouse.query("SELECT amount, label FROM staging.payments WHERE id = 1") == [
            (pytest.approx(10.25), "L1")
        ]
        assert warehouse.query("SELECT count(*) FROM staging.big_payments") == [(29,)]
        # a view over `*` lists the columns of its creation (PostgreSQL): it reads on, the new column is the model's
        assert warehouse.query("SELECT count(*) FROM staging.documents") == [(300,)]
        assert warehouse.query("SELECT has_table_privilege('public', 'staging.payments', 'SELECT')") == [(True,)]
        assert warehouse.query("SELECT obj_description('staging.payments'::regclass)") == [("payments, staged",)]

    # The next run reads only what changed after the reload: nothing reloaded, nothing read twice, nothing skipped.
    source.execute(
        "UPDATE documents SET region = 'south', updated_at = now() WHERE id = 7",
        "INSERT INTO visits VALUES (511, date '2026-01-06', '/later', 'mail')",
        "UPDATE payments SET amount = 99.99, updated_at = '2028-01-01 00:00:00+00' WHERE id = 5",
        "DELETE FROM payments WHERE id = 39",
    )
    third = run(env)
    assert "reloaded" not in third.stdout, third.stdout
    assert "summary" not in warehouse.columns("raw_evolving", "documents")
    assert table_row(third.stdout, "documents")[:3] == ["1", "0", "1"]
    assert table_row(third.stdout, "visits")[:2] == ["1", "1"]
    assert table_row(third.stdout, "payments") == ["1", "0", "1", "1", "38"]
    assert table_row(third.stdout, "people")[0] == "0"
    assert_equal_to_source(warehouse, source.url, {"documents": ", region", "visits": ", referrer"})


def test_a_retype_a_view_cannot_follow_changes_nothing_and_stops_only_its_table(
    pg_database_factory, tmp_path: Path
) -> None:
    from datamart.settings import postgres_warehouse

    warehouse = postgres_warehouse(pg_database_factory("warehouse"))
    source = Source(pg_database_factory("source"))
    source.execute(SCHEMA)
    env = command_env(warehouse, tmp_path, source.url)
    run(env)
    # a model computing on the old type: `amount + 1` cannot be created over a text column
    warehouse.query("CREATE VIEW public.amounts AS SELECT id, amount + 1 AS next FROM raw_evolving.payments")
    source.execute(
        "ALTER TABLE payments ALTER COLUMN amount TYPE text",
        "UPDATE people SET city = 'Moved', updated_at = updated_at + interval '1 year' WHERE id = 3",
    )
    result = dlt(env, "pipeline", "evolving", "run")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "error: pipeline 'evolving', table payments: the warehouse refused to change amount to varchar" in (
        result.stderr
    ), result.stderr
    assert "what to do: if a view computes on the old type, change that model first" in result.stderr
    assert "the other tables of 'evolving' were loaded" in result.stderr, result.stderr
    # nothing changed: the column, its values and the view are as they were; the other tables loaded their changes
    assert warehouse.columns("raw_evolving", "payments")["amount"] == "bigint"
    assert warehouse.query("SELECT sum(next) FROM public.amounts") == [(sum(i * 10 + 1 for i in range(1, 41)),)]
    assert warehouse.query("SELECT city FROM raw_evolving.people WHERE id = 3") == [("Moved",)]
