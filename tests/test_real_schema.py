"""A PostgreSQL source nobody here designed: enums, domains, arrays, tsvector, a partitioned table, composite keys
and a table without update timestamps, loaded with the default (fast) backend chosen per table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datamart.ingest.declarations import load_declaration
from datamart.ingest.runner import format_loads, run_pipeline
from datamart.settings import Warehouse
from datamart.testing.sources import Source, source_rows

pytestmark = pytest.mark.postgres

SCHEMA = """
CREATE TYPE doc_status AS ENUM ('draft', 'published', 'archived');
CREATE DOMAIN positive_int AS integer CHECK (VALUE > 0);
CREATE TABLE documents (
    id integer PRIMARY KEY, title text NOT NULL, search tsvector, tags text[], status doc_status,
    pages positive_int, code char(4), updated_at timestamptz NOT NULL
);
CREATE TABLE visits (
    id bigint, visited_on date, page text, PRIMARY KEY (id, visited_on)
) PARTITION BY RANGE (visited_on);
CREATE TABLE visits_2025 PARTITION OF visits FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE visits_2026 PARTITION OF visits FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
CREATE TABLE budgets (region text, year integer, amount numeric(12, 2), PRIMARY KEY (region, year));
INSERT INTO documents
SELECT i, 'Document ' || i, to_tsvector('simple', 'mission numéro ' || i), ARRAY['tag' || (i % 3), 'all'],
       (ARRAY['draft', 'published', 'archived']::doc_status[])[1 + i % 3], 1 + i % 40, 'C' || (i % 10),
       timestamptz '2026-01-01 00:00:00+00' + i * interval '1 minute'
FROM generate_series(1, 300) AS i;
INSERT INTO visits SELECT i, date '2025-12-20' + (i % 30), '/page/' || (i % 7) FROM generate_series(1, 500) AS i;
INSERT INTO budgets SELECT 'R' || r, y, r * 1000 + y / 100.0
FROM generate_series(1, 5) AS r, generate_series(2024, 2026) AS y;
"""

DECLARATION = """\
name: real_app
source:
  kind: sql_database
dataset: raw_real_app
tables:
  documents:
    write_disposition: merge
    primary_key: id
    cursor: updated_at
  visits:                 # partitioned: read through its parent
    write_disposition: merge
    primary_key: [id, visited_on]
    cursor: id
  budgets:                # no update timestamp: reloaded whole
    write_disposition: replace
"""


def test_a_tsvector_table_falls_back_to_pyarrow_and_every_value_matches(
    warehouse: Warehouse, pg_database_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = Source(pg_database_factory("source"))
    source.execute(SCHEMA)
    monkeypatch.setenv("SOURCES__REAL_APP__CREDENTIALS", source.url)
    path = tmp_path / "real_app.yaml"
    path.write_text(DECLARATION)

    run = run_pipeline(load_declaration(path), warehouse, pipelines_dir=tmp_path / "pipelines")

    # the default backend for a PostgreSQL source (connectorx) panics on tsvector: that table alone used pyarrow
    assert run.notes == [
        "table documents read with pyarrow: connectorx cannot read search (tsvector) "
        "(set backend: on the table in pipelines/real_app.yaml to choose)"
    ]
    assert "real_app: table documents read with pyarrow" in format_loads([run])
    # compare, don't count: every value of every table
    documents = warehouse.query(
        "SELECT id, title, search, tags, status, pages, code, updated_at FROM raw_real_app.documents ORDER BY id"
    )
    expected = source_rows(
        source.url,
        "SELECT id, title, search::text, tags, status::text, pages, code, updated_at FROM documents ORDER BY id",
    )
    assert len(documents) == len(expected) == 300
    for got, want in zip(documents, expected, strict=True):
        tags = got[3] if isinstance(got[3], list) else json.loads(got[3])
        assert (got[0], got[1], got[2], tags, got[4], got[5], got[6]) == want[:7]
        assert got[7] == want[7]
    visits = warehouse.query("SELECT id, visited_on, page FROM raw_real_app.visits ORDER BY id")
    assert visits == source_rows(source.url, "SELECT id, visited_on, page FROM visits ORDER BY id")
    budgets = warehouse.query("SELECT region, year, amount FROM raw_real_app.budgets ORDER BY region, year")
    assert budgets == source_rows(source.url, "SELECT region, year, amount FROM budgets ORDER BY region, year")


def test_a_declared_backend_is_used_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "real_app.yaml"
    path.write_text(DECLARATION.replace("    cursor: updated_at\n", "    cursor: updated_at\n    backend: pyarow\n"))
    from datamart.ingest.declarations import DeclarationError

    with pytest.raises(DeclarationError, match=r"tables.documents.backend: 'pyarow'.*\(did you mean 'pyarrow'\?\)"):
        load_declaration(path)
    path.write_text(DECLARATION.replace("    cursor: updated_at\n", "    cursor: updated_at\n    backend: pyarrow\n"))
    assert load_declaration(path).table("documents").backend == "pyarrow"
