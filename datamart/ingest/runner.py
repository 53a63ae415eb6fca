"""Run a declared pipeline with dlt and report, per table, what was loaded (counted in the warehouse)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import dlt
from dlt.common import logger

from datamart.ingest.declarations import PipelineDecl
from datamart.ingest.sources import build_deletions, build_resources
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
    full_refresh: bool = False,
) -> PipelineRun:
    """Extract, normalise and load one pipeline; raise if any load job failed.

    ``full_refresh`` drops the selected tables and their incremental state first (dlt's ``drop_resources``).
    """
    started = time.monotonic()
    deletions: dict[str, int] = {}
    resources = build_resources(decl, tables)
    pipeline = make_pipeline(decl, warehouse, pipelines_dir)
    if pipeline.has_pending_data:
        # A previous run extracted but did not finish loading: finish that first (dlt would otherwise load only
        # the pending packages and silently skip this run's extract).
        logger.warning("%s: loading the packages a previous run left pending", decl.name)
        pipeline.run().raise_on_failed_jobs()
    info = pipeline.run(resources, refresh="drop_resources" if full_refresh else None)
    info.raise_on_failed_jobs()
    normalized = pipeline.last_trace.last_normalize_info
    row_counts = dict(normalized.row_counts) if normalized else {}
    deletion_resources = build_deletions(decl, resources, warehouse, deletions, tables)
    if deletion_resources:
        pipeline.run(deletion_resources).raise_on_failed_jobs()
    names = [t.name for t in (decl.table(n) for n in tables)] if tables else [t.name for t in decl.tables]
    totals = count_rows(pipeline, names)
    loads = []
    for name in names:
        loads.append(TableLoad(name, int(row_counts.get(name, 0)), totals[name], deletions.get(name, 0)))
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


def format_loads(runs: list[PipelineRun]) -> str:
    """The per-table summary: rows loaded and deleted this run, rows now in the warehouse."""
    lines = [f"{'table':<36}{'loaded now':>12}{'deleted now':>13}{'in warehouse':>14}"]
    for run in runs:
        for table in run.tables:
            name = f"{run.dataset}.{table.table}"
            lines.append(f"{name:<36}{table.rows_loaded:>12,}{table.rows_deleted:>13,}{table.rows_in_warehouse:>14,}")
    seconds = sum(run.elapsed for run in runs)
    lines.append(f"{len(runs)} pipeline(s) in {seconds:.1f}s")
    return "\n".join(lines)
