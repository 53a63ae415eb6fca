"""``dlt pipeline <name> verify --repair``: reload only the key ranges where the warehouse differs from the source.

What a cursor cannot see — an update without a timestamp, a backdated insert, a row committed after a run read past
its timestamp, a row lost by a restore — ``verify`` finds as missing, extra or changed keys. The repair, under the
pipeline's lock:

1. verifies (``datamart.ingest.verify``): per drifted table, the runs of consecutive differing keys (a run ends at
   the first key that is equal on both sides, so equal rows are not reloaded; more than ``MAX_RANGES`` runs are
   merged across the smallest gaps of equal rows);
2. loads deletion rows for the warehouse keys the source no longer has, where deletions must follow (tables with
   ``deletes: {hard: key_set}``, replace tables): dlt's merge with a ``hard_delete`` column, as a run's key-set
   delete detection does (``deletes.deletion_resource``);
3. reads the source rows of those key ranges with the table's own resource (``sources.build_resources`` with a
   ``restrict`` condition: same SELECT, same backend, same personal-data treatment — hash, drop, year — as any
   run) and upserts them with dlt's merge on the declared primary key (``delete-insert``, also for append and
   replace tables, whose own strategy would skip or not key the rows). A row read with its soft-delete marker set
   (deleted below the cursor) is removed by the merge and recorded in ``ops.deleted_rows`` first, like the keys of
   step 2 and like a run's deletions: the incremental marts recompute what they find there, and the rewritten rows
   carry the repair's load id, which they read as touched (``macros/incremental.py``). The resources are read
   without their cursor: dlt's incremental state is neither read nor written, so the next run continues where the
   last one stopped. A table that lacks a source column (never loaded) is reloaded whole the same way, the column
   with it;
4. records the repair in ``ops.pipeline_runs`` like a run (the scheduled refresh restates what it changed), then
   verifies again: exit 0 when every table is equal, 1 with the remaining drift.

Not repaired (named in the report, with their fix): tables without a primary key (counted only), file and REST
tables, tables never loaded, tables whose runs do not load them (stopped by a gone source column, or failing: the
repair would write what the run refuses to), tables with a column retyped in the source (the run migrates it), and
columns held back because the table holds personal data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from datamart.ingest.declarations import PipelineDecl, TableDecl, warehouse_name
from datamart.ingest.lock import pipeline_lock
from datamart.ingest.replication import is_replication
from datamart.ingest.verify import DEFAULT_CHUNK, INTERNAL_PREFIXES, Key, TableCheck, VerifyReport, verify_pipeline
from datamart.settings import Warehouse

#: At most this many key ranges per table in one repair query (an OR of BETWEENs on the key's index).
MAX_RANGES = 500


class RepairError(RuntimeError):
    """The repair cannot start; the message says what to run first."""


@dataclass
class TableRepair:
    """What the repair did to one table, or why it left it."""

    table: str
    ranges: int = 0  # key ranges reloaded
    whole: bool = False  # reloaded whole: a source column was missing from the warehouse
    rewritten: int = 0  # rows written by the upsert (they carry the repair's load id)
    deleted: int = 0
    not_repaired: str = ""


@dataclass
class RepairReport:
    """The verify before, what was reloaded, and the verify after (None when nothing drifted)."""

    pipeline: str
    before: VerifyReport
    after: VerifyReport | None = None
    tables: list[TableRepair] = field(default_factory=list)

    @property
    def drift(self) -> bool:
        """True when the warehouse still differs from the source after the repair."""
        return (self.after or self.before).drift

    def format(self) -> str:
        """The first verify, the repair per table, the verify after it."""
        lines = [self.before.format()]
        if not self.tables:
            return "\n".join(lines)
        lines.append(f"repair {self.pipeline}: the differing key ranges reloaded from the source")
        lines.append(f"{'table':<24}{'ranges':>8}{'rewritten':>11}{'deleted':>9}  done")
        for t in self.tables:
            ranges = "whole" if t.whole else f"{t.ranges:,}"
            done = f"NOT REPAIRED: {t.not_repaired}" if t.not_repaired else "reloaded"
            lines.append(f"{t.table:<24}{ranges:>8}{t.rewritten:>11,}{t.deleted:>9,}  {done}")
        if self.after is not None:
            lines.append(self.after.format())
        verdict = "still differs: see above" if self.drift else "equal to the source"
        lines.append(f"{self.pipeline}: after repair, {verdict}")
        return "\n".join(lines)


def repair_pipeline(
    decl: PipelineDecl,
    warehouse: Warehouse,
    tables: list[str] | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    wait: float = 0.0,
    pipelines_dir: Path | None = None,
) -> RepairReport:
    """Verify ``decl`` (or ``tables``), reload the differing key ranges of each drifted table, verify again.

    Holds the pipeline's lock throughout (waiting up to ``wait`` seconds; ``PipelineLocked`` otherwise).
    """
    from datamart.environments import check_environment
    from datamart.ingest.loading import PipelineRun
    from datamart.ingest.ops import recorded_run

    with pipeline_lock(warehouse, decl.name, wait=wait):
        before = verify_pipeline(decl, warehouse, tables, chunk_size, lock=False)
        report = RepairReport(decl.name, before)
        drifted = [t for t in before.tables if t.drift]
        if not drifted:
            return report
        if is_replication(decl):  # each drifted table copied whole again while the slot serves the others
            return _copy_again(decl, warehouse, report, [c.table for c in drifted], tables, chunk_size, pipelines_dir)
        repairable = []
        for check in drifted:
            why = _not_repairable(decl, check)
            if why:
                report.tables.append(TableRepair(check.table, not_repaired=why))
            else:
                repairable.append(check)
        if not repairable:
            return report
        check_environment(warehouse)  # it writes: never into another environment's warehouse
        names = [c.table for c in repairable]
        with recorded_run(warehouse, decl.name, decl.dataset, names) as record:
            run = PipelineRun(decl.name, decl.dataset, 0.0)
            report.tables += _reload(decl, warehouse, repairable, pipelines_dir, run)
            record.succeeded(run)
        report.after = verify_pipeline(decl, warehouse, tables, chunk_size, lock=False)
        report.after.title = "verify after repair"
    return report


def _copy_again(
    decl: PipelineDecl,
    warehouse: Warehouse,
    report: RepairReport,
    names: list[str],
    tables: list[str] | None,
    chunk_size: int,
    pipelines_dir: Path | None,
) -> RepairReport:
    """The repair of a replication pipeline, under its lock: a replication run that copies the drifted tables whole
    again (``datamart/ingest/recopy.py``: whatever the drift, a missing table or column, types the key ranges
    could not load), then verify again. Key ranges are not reloaded: the copy also clears what a range repair
    cannot (a table dropped from the warehouse, columns classified after being held back)."""
    from datamart.environments import check_environment
    from datamart.ingest.ops import recorded_run
    from datamart.ingest.replication import run_replication
    from datamart.ingest.runner import _reload

    check_environment(warehouse)  # it writes: never into another environment's warehouse
    with recorded_run(warehouse, decl.name, decl.dataset, names, True) as record:
        run = run_replication(decl, warehouse, names, pipelines_dir, True, reload=_reload)
        record.succeeded(run)
    copied = {t.table: t for t in run.tables if t.table in names}
    for name in names:
        load = copied.get(name)
        rewritten, deleted = (load.rows_in_warehouse, load.rows_deleted) if load else (0, 0)
        report.tables.append(TableRepair(name, whole=True, rewritten=rewritten, deleted=deleted))
    report.after = verify_pipeline(decl, warehouse, tables, chunk_size, lock=False)
    report.after.title = "verify after repair"
    return report


def _not_repairable(decl: PipelineDecl, check: TableCheck) -> str:
    """Why the repair leaves a drifted table to another command ('' when it reloads it)."""
    if check.stopped:  # reloading rows a run would not load: the same harm (a gone column NULL on each of them)
        return f"{check.stopped}; what to do: {check.stopped_hint}"
    if check.retyped:  # the rows of the new type do not fit the column of the old one
        return f"a column's type changed in the source: run `dlt pipeline {decl.name} run` (it migrates the column)"
    if decl.kind != "sql_database":
        return f"{decl.kind} tables are not reloaded by key range; fix with `{check.fix}`"
    if check.method == "not loaded":
        return f"never loaded; run `{check.fix}`"
    if check.method != "keys+checksums":
        return f"no primary key to reload a key range by; fix with `{check.fix}`"
    return ""


def _reload(
    decl: PipelineDecl, warehouse: Warehouse, checks: list[TableCheck], pipelines_dir: Path | None, run: Any
) -> list[TableRepair]:
    """Deletions first (a key that comes back meanwhile is then inserted again by the upsert), then the upsert."""
    import time

    from datamart.ingest.deletes import deletion_marker, deletion_resource, record_deleted_rows, record_soft_deletes
    from datamart.ingest.loading import TableLoad, count_rows, loader_file_format, make_pipeline
    from datamart.ingest.sources import build_resources

    started = time.monotonic()
    pipeline = make_pipeline(decl, warehouse, pipelines_dir)
    pipeline.sync_destination()  # the state kept in the warehouse: never written by the repair, never behind it
    if pipeline.has_pending_data:
        raise RepairError(
            f"pipeline '{decl.name}' has a load left pending by an earlier run: run `dlt pipeline {decl.name} run` "
            f"first (it finishes or discards it), then `dlt pipeline {decl.name} verify --repair`"
        )
    names = [c.table for c in checks]
    by_name = {c.table: c for c in checks}
    ranges = {c.table: _coalesce(c.spans) for c in checks}
    restrict = {
        c.table: _everything if c.missing_columns else _in_ranges(decl, decl.table(c.table), ranges[c.table])
        for c in checks
    }
    known = {
        n: [c for c in warehouse.columns(decl.dataset, warehouse_name(n)) if not c.startswith(INTERNAL_PREFIXES)]
        for n in names
    }
    held_back: dict[str, list[str]] = {}
    resources = build_resources(decl, names, known_columns=known, held_back=held_back, restrict=restrict)
    # a soft-deleted row read again (deleted below the cursor) is removed by dlt's merge: recorded as a run does
    record_soft_deletes(decl, resources, warehouse)
    for resource in resources:
        if decl.table(resource.name).write_disposition != "merge":
            # an append table's insert-only merge would skip the keys it holds, a replace would empty the table
            resource.apply_hints(write_disposition={"disposition": "merge", "strategy": "delete-insert"})
    file_format = loader_file_format(decl, warehouse)
    before = count_rows(pipeline, names)[0]
    deletions = []
    for resource in resources:
        gone = by_name[resource.name].gone
        if gone:
            table = decl.table(resource.name)
            keys = _keys_table(table, gone)
            record_deleted_rows(decl, table, keys, warehouse)  # for incremental marts
            deletions.append(deletion_resource(table, keys, deletion_marker(resource, table)))
    if deletions:
        pipeline.run(deletions, loader_file_format=file_format).raise_on_failed_jobs()
    between = count_rows(pipeline, names)[0]
    info = pipeline.run(resources, loader_file_format=file_format)
    info.raise_on_failed_jobs()
    after, written = count_rows(pipeline, names, list(info.loads_ids), names)
    repairs = []
    for name in names:
        deleted = before[name] - between[name]
        inserted = max(after[name] - between[name], 0)
        rewritten = written.get(name, 0)
        repairs.append(
            TableRepair(
                name,
                ranges=len(ranges[name]),
                whole=bool(by_name[name].missing_columns),
                rewritten=rewritten,
                deleted=deleted,
            )
        )
        run.tables.append(
            TableLoad(
                table=name,
                rows_loaded=rewritten,
                rows_in_warehouse=after[name],
                rows_deleted=deleted,
                held_back=tuple(held_back.get(name, [])),
                inserted=inserted,
                updated=max(rewritten - inserted, 0),
            )
        )
    run.elapsed = time.monotonic() - started
    return repairs


def _coalesce(spans: list[list[Any]], most: int = MAX_RANGES) -> list[tuple[Key, Key]]:
    """The runs of differing keys as at most ``most`` ranges: beyond it, the runs separated by the fewest equal
    keys are merged (those equal rows are reloaded too, harmlessly)."""
    if len(spans) <= most:
        return [(first, last) for first, last, _ in spans]
    threshold = sorted(gap for _, _, gap in spans[1:])[len(spans) - most - 1]
    merged: list[list[Any]] = []
    for first, last, gap in spans:
        if merged and gap <= threshold:
            merged[-1][1] = last
        else:
            merged.append([first, last])
    return [(first, last) for first, last in merged]


def _everything(source: Any) -> Any:
    import sqlalchemy as sa

    return sa.true()


def _in_ranges(decl: PipelineDecl, table: TableDecl, ranges: list[tuple[Key, Key]]) -> Any:
    """The condition ``key BETWEEN first AND last OR …`` on the (adapted) source table, in the order verify read
    the keys: byte order for PostgreSQL text keys, as ``verify`` compared them."""
    from datamart.ingest.sources import source_credentials

    postgres = source_credentials(decl).startswith("postgresql")

    def condition(source: Any) -> Any:
        import sqlalchemy as sa

        columns = [source.c[k] for k in table.primary_key]
        if postgres:
            columns = [c.collate("C") if isinstance(c.type, sa.String) else c for c in columns]
        parts = []
        for first, last in ranges:
            low = [_bound(v, c) for v, c in zip(first, columns, strict=True)]
            high = [_bound(v, c) for v, c in zip(last, columns, strict=True)]
            if len(columns) == 1:
                parts.append(columns[0] == low[0] if first == last else columns[0].between(low[0], high[0]))
            else:
                key = sa.tuple_(*columns)
                parts.append(sa.and_(key >= sa.tuple_(*low), key <= sa.tuple_(*high)))
        return sa.or_(*parts) if parts else sa.false()

    return condition


def _bound(value: Any, column: Any) -> Any:
    """A key value as verify holds it (timestamps naive UTC) for a comparison with the source column."""
    if isinstance(value, datetime) and getattr(column.type, "timezone", False):
        return value.replace(tzinfo=UTC)
    return value


def _keys_table(table: TableDecl, keys: list[Key]) -> Any:
    """The keys to delete as an arrow table of the declared key columns."""
    import pyarrow as pa

    return pa.table({name: [key[i] for key in keys] for i, name in enumerate(table.primary_key)})
