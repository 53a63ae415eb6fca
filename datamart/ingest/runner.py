"""Run a declared pipeline with dlt and report, per table, what was loaded (counted in the warehouse)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import dlt

from datamart.ingest.declarations import PipelineDecl
from datamart.ingest.sources import build_resources
from datamart.settings import DATA_DIR, Warehouse


@dataclass(frozen=True)
class TableLoad:
    """What one run did to one table."""

    table: str
    rows_loaded: int
    rows_in_warehouse: int
    rows_deleted: int = 0


@dataclass
class PipelineRun:
    """What one run of one pipeline did."""

    pipeline: str
    dataset: str
    elapsed: float
    tables: list[TableLoad] = field(default_factory=list)

    @property
    def rows_loaded(self) -> int:
        """Rows written or deleted this run, all tables together."""
        return sum(t.rows_loaded + t.rows_deleted for t in self.tables)

    def loaded_tables(self) -> list[str]:
        """Qualified names (``dataset.table``) of the tables that received rows this run."""
        return [f"{self.dataset}.{t.table}" for t in self.tables if t.rows_loaded or t.rows_deleted]


def default_pipelines_dir(warehouse: Warehouse) -> Path:
    """dlt's local working dirs (``DATAMART_PIPELINES_DIR`` or under data/), one per warehouse target.

    One folder per target so that switching target never mixes two warehouses' incremental states.
    """
    base = Path(os.environ.get("DATAMART_PIPELINES_DIR") or DATA_DIR / "dlt" / "pipelines")
    return base / warehouse.target


def make_pipeline(decl: PipelineDecl, warehouse: Warehouse, pipelines_dir: Path | None = None) -> dlt.Pipeline:
    """The dlt pipeline of a declaration, bound to the warehouse; its state lives in the warehouse too."""
    return dlt.pipeline(
        pipeline_name=decl.name,
        destination=warehouse.dlt_destination(),
        dataset_name=decl.dataset,
        pipelines_dir=str(pipelines_dir or default_pipelines_dir(warehouse)),
    )


def run_pipeline(
    decl: PipelineDecl,
    warehouse: Warehouse,
    tables: list[str] | None = None,
    pipelines_dir: Path | None = None,
) -> PipelineRun:
    """Extract, normalise and load one pipeline; raise if any load job failed."""
    started = time.monotonic()
    deletions: dict[str, int] = {}
    resources = build_resources(decl, tables, warehouse=warehouse, deletions=deletions)
    pipeline = make_pipeline(decl, warehouse, pipelines_dir)
    info = pipeline.run(resources)
    info.raise_on_failed_jobs()
    normalized = pipeline.last_trace.last_normalize_info
    row_counts = dict(normalized.row_counts) if normalized else {}
    names = [t.name for t in (decl.table(n) for n in tables)] if tables else [t.name for t in decl.tables]
    totals = count_rows(pipeline, names)
    loads = []
    for name in names:
        deleted = deletions.get(name, 0)
        # dlt counts deletion rows with the table's rows: report them apart
        loads.append(TableLoad(name, int(row_counts.get(name, 0)) - deleted, totals[name], deleted))
    return PipelineRun(pipeline=decl.name, dataset=decl.dataset, elapsed=time.monotonic() - started, tables=loads)


def count_rows(pipeline: dlt.Pipeline, tables: list[str]) -> dict[str, int]:
    """Row counts read from the warehouse itself (dlt's trace counts are not trusted for totals)."""
    from dlt.destinations.exceptions import DatabaseUndefinedRelation

    counts: dict[str, int] = {}
    with pipeline.sql_client() as client:
        for table in tables:
            try:
                with client.execute_query(f"SELECT count(*) FROM {client.make_qualified_table_name(table)}") as cursor:
                    counts[table] = int(cursor.fetchone()[0])
            except DatabaseUndefinedRelation:  # nothing ever loaded into it (e.g. no file yet)
                counts[table] = 0
    return counts
