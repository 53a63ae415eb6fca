"""The pieces of a pipeline run that every way of loading shares (the cursor runner, replication, repair): the
dlt pipeline of a declaration, its resources built table by table, the counts taken in the warehouse, what a run
loaded, and a load left pending by an earlier run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dlt
from dlt.common import logger

from datamart.errors import in_chain, is_transient, refused_credentials, root_cause
from datamart.ingest.declarations import VALID_TO, PipelineDecl, warehouse_name
from datamart.ingest.sources import build_resources
from datamart.logs import progress_collector
from datamart.settings import Warehouse, pipelines_dir_for


@dataclass(frozen=True)
class TableLoad:
    """What one run did to one table."""

    table: str
    rows_loaded: int
    rows_in_warehouse: int
    rows_deleted: int = 0  # hard deletes found by comparing key sets
    new_columns: tuple[str, ...] = ()
    held_back: tuple[str, ...] = ()
    inserted: int = 0
    updated: int = 0
    soft_deleted: int = 0  # rows read with their soft-delete marker set, hence removed (or never inserted)
    change: str = ""  # the source's schema change this run applied by reloading the table (see evolution.py)


@dataclass
class PipelineRun:
    """What one run of one pipeline did."""

    pipeline: str
    dataset: str
    elapsed: float
    tables: list[TableLoad] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. a load left pending by a killed run, finished first
    # tables not loaded because their source dropped a column: table -> which column, where (see dropped.py)
    stopped: dict[str, str] = field(default_factory=dict)
    # seconds per part of the run: dlt's extract, normalize and load steps (from its trace), key-set delete
    # detection and the row counts taken in the warehouse
    profile: dict[str, float] = field(default_factory=dict)

    @property
    def rows_loaded(self) -> int:
        """Rows written or deleted this run, all tables together."""
        return sum(t.rows_loaded + t.rows_deleted for t in self.tables)


def default_pipelines_dir(warehouse: Warehouse) -> Path:
    """dlt's local working dirs (``DATAMART_PIPELINES_DIR`` or under data/), one per warehouse target.

    One folder per target (and per environment other than dev) so that switching target or ``DATAMART_ENV`` never
    mixes two warehouses' incremental states. dlt's own CLI finds the same folder (``datamart/dlt_plugin.py``).
    """
    return pipelines_dir_for(warehouse.target, warehouse.environment)


def make_pipeline(decl: PipelineDecl, warehouse: Warehouse, pipelines_dir: Path | None = None) -> dlt.Pipeline:
    """The dlt pipeline of a declaration, bound to the warehouse; its state lives in the warehouse too. Every load
    step it runs leaves the planner statistics on the tables it changed (:class:`AnalyzeLoaded`)."""
    return dlt.pipeline(
        pipeline_name=decl.name,
        destination=warehouse.dlt_destination(),
        dataset_name=decl.dataset,
        pipelines_dir=str(pipelines_dir or default_pipelines_dir(warehouse)),
        # bars on a terminal, periodic lines in the log file elsewhere (datamart/logs.py), and the statistics
        progress=analyzing_collector(warehouse),
    )


def analyzing_collector(warehouse: Warehouse) -> Any:
    """dlt's progress collector of :func:`datamart.logs.progress_collector` (its class and options), made to
    analyse what each load step changed (:class:`AnalyzeLoaded`)."""
    base, options = progress_collector()
    return type(f"AnalyzeLoaded{base.__name__}", (AnalyzeLoaded, base), {})(warehouse, **options)


class AnalyzeLoaded:
    """Mixed into dlt's progress collector (bars or log lines): also analyses, at the end of each load step, the
    tables that step changed (:meth:`Warehouse.analyze`: ``ANALYZE`` on PostgreSQL, nothing on DuckDB), so that the
    planner of SQLMesh's next build has their statistics.

    dlt never analyses what it loads, and offers no hook of its own after a load but its collector's
    ``on_end_trace_step``, called for every step of every ``run``/``load`` of the pipeline: the one place every way of
    loading passes through (a cursor run, its deletions and reloads, a full refresh, a load left pending, replication,
    ``verify --repair``), whichever code calls dlt. A failed ANALYZE does not fail the load (its rows are committed; a
    warning names the tables, which autovacuum analyses later).
    """

    def __init__(self, warehouse: Warehouse, **options: Any) -> None:
        super().__init__(**options)
        self.warehouse = warehouse

    def on_end_trace_step(self, trace: Any, step: Any, pipeline: Any, step_info: Any, send_state: bool) -> None:
        super().on_end_trace_step(trace, step, pipeline, step_info, send_state)
        if step.step != "load" or step_info is None:  # a failed load step gives the jobs it completed too
            return
        tables = loaded_tables(step_info)
        try:
            self.warehouse.analyze((pipeline.dataset_name, table) for table in tables)
        except Exception as exc:  # noqa: BLE001 - statistics only: the load itself is committed (see above)
            logger.warning(
                "%s: could not analyse %s after the load (%s); autovacuum will",
                pipeline.pipeline_name,
                ", ".join(tables),
                root_cause(exc),
            )


def loaded_tables(info: Any) -> list[str]:
    """The tables whose load jobs completed in the load step ``info`` (dlt's LoadInfo): rows written, merged,
    replaced or deleted, nested tables included; dlt's own bookkeeping tables (``_dlt_…``) left out, which only dlt
    reads."""
    return sorted(
        {
            job.job_file_info.table_name
            for package in info.load_packages
            for job in package.jobs.get("completed_jobs", [])
            if not job.job_file_info.table_name.startswith("_dlt_")
        }
    )


class TablesFailed(Exception):
    """Some tables of a pipeline could not be read; ``run`` is what the others loaded (None: no table loaded)."""

    def __init__(self, pipeline: str, errors: dict[str, BaseException], run: PipelineRun | None) -> None:
        self.errors = errors
        self.run = run
        loaded = f"; the other tables loaded ({', '.join(t.table for t in run.tables)})" if run else ""
        causes = "; ".join(f"{table}: {error}" for table, error in errors.items())
        super().__init__(f"pipeline '{pipeline}': table(s) {', '.join(errors)} not loaded{loaded}. {causes}")


def _build_each(
    decl: PipelineDecl,
    names: list[str],
    known: dict[str, list[str]],
    held_back: dict[str, list[str]],
    failed: dict[str, BaseException],
    notes: list[str] | None = None,
) -> list[Any]:
    """The resources of ``names``. SQL tables are reflected table by table: a table the source does not have
    (renamed, dropped) is put in ``failed`` and the others are built. Wrong declarations and unreachable sources
    stop the run. REST endpoints and file tables are built together (a child endpoint needs its parent's resource).
    """
    from datamart.ingest.declarations import DeclarationError
    from datamart.settings import SettingsError

    for name in names:  # built again after a failed extract: the columns held back are listed again
        held_back.pop(name, None)
    if decl.kind != "sql_database":
        return build_resources(decl, names, known_columns=known, held_back=held_back, notes=notes) if names else []
    resources = []
    for name in names:
        try:
            resources += build_resources(decl, [name], known_columns=known, held_back=held_back, notes=notes)
        except (DeclarationError, SettingsError):
            raise
        except Exception as exc:
            if is_transient(exc) or refused_credentials(exc) is not None:
                raise  # the source as a whole: every table would fail the same way
            failed[name] = exc
    return resources


def failed_table(exc: BaseException, decl: PipelineDecl, names: list[str]) -> str | None:
    """The declared table (among ``names``) whose extract failed for a reason of its own, or None: a failure of
    another step, a transient one, or one that names no table stops the whole run."""
    from dlt.common.schema.exceptions import DataValidationError
    from dlt.extract.exceptions import PipeException
    from dlt.pipeline.exceptions import PipelineStepFailed

    step = in_chain(exc, PipelineStepFailed)
    if step is None or getattr(step, "step", None) != "extract" or is_transient(exc):
        return None
    contract, pipe = in_chain(exc, DataValidationError), in_chain(exc, PipeException)
    named = getattr(contract, "table_name", None) or getattr(pipe, "pipe_name", None)
    for name in names:
        if named in (name, warehouse_name(name)):
            return name
    return None


def loader_file_format(decl: PipelineDecl, warehouse: Warehouse) -> str | None:
    """Parquet for arrow-extracted pipelines (SQL, files) into PostgreSQL when the ADBC driver is installed (dlt
    then loads with COPY through ADBC: measured ≈ 2.7× faster than its csv default), else dlt's default."""
    if not warehouse.is_server or decl.kind not in ("sql_database", "filesystem"):
        return None
    try:
        import adbc_driver_postgresql  # noqa: F401
    except ImportError:
        return None
    return "parquet"


def finish_or_abort_pending(pipeline: dlt.Pipeline) -> tuple[str, bool]:
    """Load what a previous run left pending; if it fails for good, abort it so this run re-reads the source.

    A run killed after its extract (during normalize or load) leaves its package in the working directory, with
    the incremental state that goes with it: finishing it loads exactly those rows, then this run reads what
    changed since. Returns a line for the summary.

    dlt would otherwise retry the same broken package at every run and skip every new extract (a type change, a
    value the warehouse refuses…). Aborting restores the incremental state of before that package, so the rows
    are read again from the source, this time through the fixed declaration or data: nothing is lost.
    The boolean says whether the pending load was completed (False: aborted).
    """
    try:
        pipeline.run().raise_on_failed_jobs()
    except Exception as exc:
        if is_transient(exc):
            raise
        logger.warning(
            "%s: a previous run left a load that fails (%s); aborting it and re-reading from the source",
            pipeline.pipeline_name,
            root_cause(exc),
        )
        pipeline.abort_packages()
        return f"aborted a failing load left by an earlier run ({root_cause(exc)}): its rows were read again", False
    note = "completed a load left pending by an earlier run or attempt (interrupted or killed) before reading the "
    return note + "source; its rows are counted in this run's", True


def count_rows(
    pipeline: dlt.Pipeline,
    tables: list[str],
    load_ids: list[str] | None = None,
    written_in: list[str] | None = None,
) -> tuple[dict[str, int], dict[str, int]]:
    """Row counts read from the warehouse itself (dlt's trace counts are not trusted for totals), and for the
    tables of ``written_in`` the rows the loads ``load_ids`` wrote, counted in the same scan. A history table
    (``history: scd2``: dlt's schema gives it validity columns) counts its current versions only (one per key, as
    the source), whoever asks."""

    from dlt.destinations.exceptions import DatabaseUndefinedRelation

    counts: dict[str, int] = {}
    written: dict[str, int] = {}
    # ids dlt generated (epoch seconds): safe to inline
    loads = ", ".join(f"'{i}'" for i in load_ids or [])
    schema_tables = pipeline.default_schema.tables if pipeline.default_schema_name else {}
    with pipeline.sql_client() as client:
        for table in tables:
            of_loads = table in (written_in or []) and loads
            written_column = f", count(CASE WHEN _dlt_load_id IN ({loads}) THEN 1 END)" if of_loads else ""
            qualified = client.make_qualified_table_name(warehouse_name(table))
            try:
                history = VALID_TO in schema_tables.get(warehouse_name(table), {}).get("columns", {})
                current = f" WHERE {VALID_TO} IS NULL" if history else ""
                with client.execute_query(f"SELECT count(*){written_column} FROM {qualified}{current}") as cursor:
                    row = cursor.fetchone()
            except DatabaseUndefinedRelation:  # nothing ever loaded into it (e.g. no file yet)
                row = (0, 0)
            counts[table] = int(row[0])
            if of_loads:
                written[table] = int(row[1])
    return counts, written
