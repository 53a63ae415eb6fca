"""SQLMesh on the same warehouse as dlt: build the datamart and promote it to prod."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlmesh.utils.errors import AuditError, NodeAuditsErrors, PlanError, SQLMeshError

from datamart.gate.base import is_published, short_name
from datamart.gate.checks import GateError, enforce
from datamart.gate.published import PublishedGateError, take_away_violations
from datamart.grants import GrantReport, apply_metabase_grants
from datamart.ingest.ops import ensure_ops_tables, last_refresh, prune_deleted_rows, recorded_refresh
from datamart.settings import PROJECT_ROOT, Warehouse, quote_identifier


class PromotionError(SQLMeshError):
    """A prod plan failed; the message names each model and audit that failed and what to do."""


@dataclass
class TransformRun:
    """What one prod plan did."""

    models_built: list[str] = field(default_factory=list)
    audits_passed: int = 0
    published_views: list[str] = field(default_factory=list)
    grants: GrantReport | None = None
    elapsed: float = 0.0
    views_swapped: list[str] = field(default_factory=list)  # prod views now pointing at another version

    def built_line(self) -> str:
        """``Models built: N (…)`` and, when views moved to a version built earlier, ``views swapped: …``."""
        built = ", ".join(self.models_built) or "none: the data they read had not changed"
        line = f"Models built: {len(self.models_built)} ({built})"
        reused = [v for v in self.views_swapped if v not in self.models_built]
        if reused:
            line += f"; views switched to a version built earlier: {', '.join(reused)}"
        return line


def sqlmesh_context(warehouse: Warehouse, project: Path | None = None, **kwargs: Any) -> Any:
    """A SQLMesh Context on this project (or a copy of it at ``project``), connected to ``warehouse``.

    The configuration is the one the project's ``config.py`` builds, for this warehouse rather than the selected one.
    """
    from sqlmesh import Context

    from datamart.sqlmesh_config import sqlmesh_config

    kwargs.setdefault("config", sqlmesh_config(warehouse))
    return Context(paths=[str(project or PROJECT_ROOT)], **kwargs)


def apply_prod(warehouse: Warehouse, project: Path | None = None, command: str = "promote") -> TransformRun:
    """Apply model changes to prod, then rebuild what reads raw data loaded since the published views last did.

    First what prod publishes now is checked (a view published past the gate is dropped from the published schema:
    ``datamart.gate.published``), then the review gate (``datamart.gate.checks.CHECKS``, the contract of the
    published views) runs against the contract of the last good promotion: a refused change raises ``GateError``
    before anything is planned, and prod is not touched. Then a
    prod plan builds the changed models, and :func:`refresh_prod` restates what the loads since the last refresh
    changed. A failing audit raises a :class:`PromotionError` naming the model and the audit, before the views are
    swapped and before the models downstream of it are rebuilt: those keep serving their previous data.
    """
    started = time.monotonic()
    ensure_ops_tables(warehouse)  # marts.data_freshness_v1 reads them, even before any pipeline ran
    context = sqlmesh_context(warehouse, project)
    # a view published past the gate (a plan without its hooks) is taken away from Metabase first; promoting a
    # project that passes the gate is then the way back
    _, taken_away = take_away_violations(context, warehouse, project)
    try:
        enforce(context, project, warehouse)
    except GateError as exc:
        if taken_away:
            exc.add_note(
                f"Taken away from Metabase (prod published them past the gate): {', '.join(taken_away)}; promoting "
                "a project that passes the gate publishes them again."
            )
        raise
    # The role and the published schema's default privileges exist before the plan creates its first view.
    setup = apply_metabase_grants(warehouse)
    with audits_named_on_failure(), recorded_refresh(warehouse, command) as record:
        before = _prod_fingerprints(context)
        plan = context.plan("prod", auto_apply=True, no_prompts=True)
        built = {s.name: s for s in plan.new_snapshots}
        built.update(_restate_changed(context, warehouse, record.started_at, before is not None))
        result = _transform_run(context, warehouse, built, before, started)
        if setup is not None and result.grants is not None:
            result.grants.created = result.grants.created or setup.created
        record.models = result.models_built
    return result


def refresh_prod(warehouse: Warehouse, execution_time: str | None = None) -> RefreshRun:
    """Bring prod's published views up to the raw tables, without promoting anything: the scheduled run's refresh.

    First what prod publishes is checked: a view published past the review gate (``datamart.gate.published``) is
    dropped from the published schema and the refresh stops with :class:`PublishedGateError`. Then
    SQLMesh's run of prod's due intervals (each model on its ``cron``), then a restatement of the models reading a
    raw table loaded (or deleted from) since the last refresh. A restatement plan works from SQLMesh's state, not
    from the project's files (SQLMesh ignores local changes when restating), so prod keeps its own model versions
    even when this checkout differs: new versions reach prod only through the gate (``make promote``).
    """
    started = time.monotonic()
    ensure_ops_tables(warehouse)
    context = sqlmesh_context(warehouse)
    prod = context.state_reader.get_environment("prod")
    if prod is None:
        raise NeverPromoted(
            "prod has never been built in this warehouse: there is nothing to refresh; run `make promote` once (it "
            "builds prod from the project through the review gate), then the scheduled run"
        )
    # what prod publishes passes the gate, whatever plan put it there; else it is taken away and the refresh stops
    found, taken_away = take_away_violations(context, warehouse)
    if found:
        raise PublishedGateError(found, taken_away, planned=False)
    in_prod = {s.name: s.fingerprint for s in prod.snapshots}
    in_project = {s.name: s.fingerprint for s in context.snapshots.values()}
    refresh = RefreshRun(
        differs=sorted(short_name(n) for n in in_project.keys() | in_prod.keys() if in_project.get(n) != in_prod.get(n))
    )
    with audits_named_on_failure(), recorded_refresh(warehouse, "scheduled") as record:
        status = context.run("prod", execution_time=execution_time)
        if status.is_failure:
            raise PromotionError(
                "SQLMesh's run of prod failed (the model and error are in the log above); the published views keep "
                "their previous data"
            )
        refresh.ran_due_intervals = not status.is_nothing_to_do
        restated = _restate_changed(context, warehouse, record.started_at, True)
        refresh.models_restated = sorted(
            short_name(s.name) for s in restated.values() if s.is_model and not s.is_external and not s.is_symbolic
        )
        record.models = refresh.models_restated
    refresh.elapsed = time.monotonic() - started
    return refresh


class NeverPromoted(SQLMeshError):
    """The warehouse has no prod environment yet: only a promotion (through the gate) may create it."""


@dataclass
class RefreshRun:
    """What one refresh of prod did (the scheduled run)."""

    differs: list[str] = field(default_factory=list)  # models whose project version is not prod's
    ran_due_intervals: bool = False
    models_restated: list[str] = field(default_factory=list)
    elapsed: float = 0.0


def _prod_fingerprints(context: Any) -> dict[str, str] | None:
    prod = context.state_reader.get_environment("prod")
    return None if prod is None else {s.name: s.fingerprint for s in prod.snapshots}


def _restate_changed(context: Any, warehouse: Warehouse, refresh_started: datetime, prod_existed: bool) -> dict:
    """Restate in prod the external models whose raw table changed since the last refresh; the snapshots restated.

    Since when: the start of the last succeeded refresh (``ops.datamart_refreshes``), or when no refresh is recorded,
    the time prod was last finalized. Nothing when prod did not exist before this command (it was just built whole).
    The external models of those datasets are restated (SQLMesh restates everything downstream of them, one model
    after the other, each in one transaction).
    """
    # Prod's snapshots, read from SQLMesh's state once: a refresh works from prod's versions, not the checkout's
    # (see refresh_prod), and a run or a restatement does not change which versions prod holds.
    prod = context.state_reader.get_environment("prod")
    snapshots = {} if prod is None else {s.name: s for s in context.state_reader.get_snapshots(prod.snapshots).values()}
    by_key = {name for name, s in snapshots.items() if s.is_model and s.model.kind.is_incremental_by_unique_key}
    if prod_existed:
        restated, touched = _restate_raw_changes(context, warehouse, refresh_started, snapshots, by_key)
    else:
        restated, touched = {}, set()
    # SQLMesh restates an INCREMENTAL_BY_UNIQUE_KEY model whole (ModelKind.full_history_restatement_only): those
    # models are left out of the restatement and brought up to date by a run of their intervals since their last run
    # instead (ignore_cron, and allow_partials in the model: the interval ends now), which recomputes the keys touched
    # meanwhile. Also after a first build, whose plan stopped at the last cron tick.
    if by_key:
        status = context.run("prod", ignore_cron=True, select_models=sorted(by_key), no_auto_upstream=True)
        if status.is_failure:
            raise PromotionError(
                "SQLMesh's run of the incremental marts failed (the model and error are in the log above); their "
                "published views keep their previous data"
            )
        if touched and not status.is_nothing_to_do:  # reported when a raw table they read changed
            restated.update({name: snapshots[name] for name in touched})
        prune_deleted_rows(warehouse, refresh_started)  # read by them up to now
    return restated


def _restate_raw_changes(
    context: Any, warehouse: Warehouse, refresh_started: datetime, snapshots: dict[str, Any], by_key: set[str]
) -> tuple[dict, set[str]]:
    """Restate the models reading the raw tables changed since the last refresh (see :func:`_restate_changed`); the
    snapshots restated, and the incremental-by-key models reading those tables (refreshed by the caller's run).
    ``snapshots``: prod's, by name; ``by_key``: the names of its incremental-by-key models."""
    last = last_refresh(warehouse)
    if last is None:
        prod = context.state_reader.get_environment("prod")
        if prod is None or not prod.finalized_ts:
            return {}, set()
        since_ms = prod.finalized_ts
    else:
        since_ms = int(last.timestamp() * 1000)
    since_ms = min(since_ms, int(refresh_started.timestamp() * 1000))
    externals = [short_name(m.fqn) for m in context.models.values() if m.kind.is_external]
    fresh = datasets_loaded_since(warehouse, {e.split(".")[0] for e in externals}, since_ms)
    candidates = sorted(e for e in externals if e.split(".")[0] in fresh)
    restate = tables_changed_since(warehouse, candidates, since_ms)
    if not restate:
        return {}, set()
    start = restatement_start(context, warehouse, restate, since_ms)
    downstream = {d for name in restate for d in context.dag.downstream(context.get_model(name).fqn)}
    touched = downstream & by_key
    models = _restated_models(context, restate, downstream, by_key)
    if touched:  # the views between the raw tables and the marts are not restated: their audits first, by hand
        _audit_views(context, snapshots, downstream, start)
    if not models:
        return {}, touched
    # skip_linter, skip_tests: a restatement rebuilds prod's own versions from SQLMesh's state, never the checkout's
    # models, so neither the review gate (a linter rule comparing the checkout with prod) nor the checkout's unit tests
    # (run by the promotion that brought those versions to prod) have anything to say about it. The unit tests were
    # about 40 % of a plan's time with nothing to do (issue 18's profile).
    plan = context.plan(
        "prod",
        auto_apply=True,
        no_prompts=True,
        restate_models=models,
        start=start,
        skip_linter=True,
        skip_tests=True,
    )
    return {plan.snapshots[sid].name: plan.snapshots[sid] for sid in plan.restatements}, touched


def _restated_models(context: Any, changed: list[str], downstream: set[str], by_key: set[str]) -> list[str]:
    """What to restate for the changed external models (``downstream``: everything downstream of them): themselves
    when no incremental-by-key model reads them, else each materialised model downstream of them except the
    incremental-by-key ones (views hold no data)."""
    if not downstream & by_key:
        return changed
    kept = []
    for fqn in sorted(downstream - by_key):
        model = context.get_model(fqn)
        if model is not None and not model.kind.is_view and not model.kind.is_external:
            kept.append(short_name(fqn))
    return kept


def _audit_views(context: Any, snapshots: dict[str, Any], downstream: set[str], start: Any) -> None:
    """Run the audits of prod's views in ``downstream`` (of the changed external models), and stop before any mart
    changes when a blocking one fails.

    A restatement of the external models would rebuild those views and run their audits before the marts reading them
    (SQLMesh stops what is downstream of a failing audit), but it would also restate the incremental-by-key marts
    whole, so :func:`_restated_models` leaves the views out: their audits (an unknown organization kind in staging)
    are run here instead, with SQLMesh's own evaluator on prod's versions of the views. A failure is reported as an
    AuditError, the error a plan's failing audit raises, so both read the same (:func:`_failed_audits_error`).
    """
    failed: list[AuditError] = []
    for name in sorted(downstream):
        snapshot = snapshots.get(name)
        if snapshot is None or not snapshot.is_model or not snapshot.model.kind.is_view:
            continue
        results = context.snapshot_evaluator.audit(
            snapshot=snapshot, snapshots=snapshots, start=start, end=datetime.now(UTC)
        )
        for result in results:
            if result.count and result.blocking and not result.skipped:
                failed.append(
                    AuditError(
                        audit_name=result.audit.name,
                        audit_args=result.audit_args,
                        model=snapshot.model,
                        count=result.count,
                        query=result.query,
                        adapter_dialect=context.snapshot_evaluator.adapter.dialect,
                    )
                )
    if failed:
        raise _failed_audits_error(failed)


def _failed_audits_error(failed: list[AuditError]) -> PromotionError:
    """The error naming each failed model and audit, and what to do."""
    lines = [
        f"model {e.model_name or '?'}: audit {e.audit_name} failed on {e.count} row(s); the rows: {e.sql()}"
        for e in failed
    ]
    return PromotionError(
        "the prod plan stopped on failing audits, the models that depend on them were not rebuilt and the "
        "published views keep their previous data:\n"
        + "\n".join(lines)
        + "\nFix the source data (the next run loads the corrected rows) or the model, then run again."
    )


def _transform_run(
    context: Any, warehouse: Warehouse, built: dict, before: dict[str, str] | None, started: float
) -> TransformRun:
    result = TransformRun()
    models = [s for s in built.values() if s.is_model and not s.is_external and not s.is_symbolic]
    result.models_built = sorted(short_name(s.name) for s in models)
    result.audits_passed = sum(len(s.model.audits) for s in models)
    after = _prod_fingerprints(context) or {}
    externals = {m.fqn for m in context.models.values() if m.kind.is_external}
    result.views_swapped = sorted(
        short_name(name)
        for name, fingerprint in after.items()
        if (before or {}).get(name) != fingerprint and name not in externals
    )
    result.published_views = published_views(context)
    # Not needed for Metabase to read the new views (the schema's default privileges grant each one as it is created,
    # see datamart/grants.py): the report of what the role may read, and revokes of what new schemas may give.
    result.grants = apply_metabase_grants(warehouse)
    result.elapsed = time.monotonic() - started
    return result


@contextmanager
def audits_named_on_failure() -> Iterator[None]:
    """Turn SQLMesh's bare "Plan application failed." into an error naming each failed model and audit.

    SQLMesh logs the audit errors (at INFO, from its scheduler or plan evaluator) and raises a PlanError without them.
    """
    failed: list[AuditError] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            error = record.exc_info[1] if record.exc_info else None
            while error is not None:
                if isinstance(error, NodeAuditsErrors):
                    failed.extend(error.errors)
                error = error.__cause__

    sqlmesh_logger = logging.getLogger("sqlmesh")
    handler, level = Collect(logging.INFO), sqlmesh_logger.level
    sqlmesh_logger.addHandler(handler)
    sqlmesh_logger.setLevel(logging.INFO)
    try:
        yield
    except PlanError as exc:
        if not failed:
            raise
        raise _failed_audits_error(failed) from exc
    finally:
        sqlmesh_logger.removeHandler(handler)
        sqlmesh_logger.setLevel(level)


def datasets_loaded_since(warehouse: Warehouse, datasets: set[str], since_ms: int) -> set[str]:
    """The raw datasets where dlt completed a load after ``since_ms`` (epoch milliseconds)."""
    fresh = set()
    for dataset in sorted(datasets):
        if not warehouse.table_exists(dataset, "_dlt_loads"):
            continue  # dlt never loaded this dataset
        loads = f"{quote_identifier(dataset)}._dlt_loads"
        latest = warehouse.query(f"SELECT max(load_id) FROM {loads} WHERE status = 0")[0][0]
        # dlt's load ids are the epoch seconds at which the load package was created
        if latest is not None and float(latest) * 1000 > since_ms - 1000:
            fresh.add(dataset)
    return fresh


def tables_changed_since(warehouse: Warehouse, tables: list[str], since_ms: int) -> list[str]:
    """Of ``tables`` (``dataset.table``, in datasets dlt loaded since ``since_ms``), those that may have changed.

    A table changed when it holds rows of a newer load. A deleted row leaves no trace in its table (and dlt's staging
    copy is emptied after each load, see .dlt/config.toml), so a table whose pipeline declares deletes also changed
    when a run recorded since then in ``ops.pipeline_run_tables`` deleted rows from it. A table without
    ``_dlt_load_id``, or one declaring deletes in a warehouse without run records, counts as changed.
    """
    deleting = _tables_with_deletes()
    deleted = _tables_with_deletions_since(warehouse, since_ms)
    changed = []
    for name in tables:
        dataset, table = name.split(".")
        if "_dlt_load_id" not in warehouse.columns(dataset, table) or _has_newer_rows(warehouse, name, since_ms):
            changed.append(name)
        elif name in deleting and (deleted is None or name in deleted):
            changed.append(name)
    return changed


def _tables_with_deletions_since(warehouse: Warehouse, since_ms: int) -> set[str] | None:
    """``dataset.table`` of the tables a pipeline run ended after ``since_ms`` deleted rows from (run records in
    schema ops); None when the warehouse has no run records."""
    from datamart.ingest.declarations import warehouse_name
    from datamart.ingest.ops import OPS_SCHEMA, RUN_TABLES_TABLE

    if not warehouse.table_exists(OPS_SCHEMA, RUN_TABLES_TABLE):
        return None
    rows = warehouse.query(
        f"SELECT dataset, table_name, max(ended_at) FROM {OPS_SCHEMA}.{RUN_TABLES_TABLE} "
        "WHERE rows_deleted > 0 GROUP BY dataset, table_name"
    )
    since = datetime.fromtimestamp(since_ms / 1000 - 1, UTC)
    return {
        f"{warehouse_name(dataset)}.{warehouse_name(table)}"
        for dataset, table, ended in rows
        if ended is not None and (ended if ended.tzinfo else ended.replace(tzinfo=UTC)) > since
    }


def _has_newer_rows(warehouse: Warehouse, name: str, since_ms: int) -> bool:
    return bool(warehouse.query(f"SELECT 1 FROM {_qualified(name)} WHERE {_newer_load(since_ms)} LIMIT 1"))


def restatement_start(context: Any, warehouse: Warehouse, restated: list[str], since_ms: int) -> Any:
    """Where the restatement of the time-incremental models may start; None for their whole history.

    A model of kind INCREMENTAL_BY_TIME_RANGE only needs the intervals that the changed rows fall into. Its time
    column is traced (SQLMesh column lineage) down to a column of each restated raw table it reads; the earliest
    value of that column among the rows loaded since ``since_ms`` is the start. A restated table it reads without
    such a column (a dimension, e.g. partner names) or where rows may have been deleted forces the whole history.
    FULL models are rebuilt whole in any case (SQLMesh expands their restatement).
    """
    restated_fqns = {context.get_model(name).fqn: name for name in restated}
    deleting = _tables_with_deletes()
    starts = []
    for model in context.models.values():
        if not model.kind.is_incremental_by_time_range:
            continue
        upstream = {fqn for fqn in context.dag.upstream(model.fqn) if fqn in restated_fqns}
        if not upstream:
            continue
        time_columns = _external_columns(context, model.fqn, model.time_column.column.name)
        for fqn in upstream:
            name = restated_fqns[fqn]
            columns = time_columns.get(fqn)
            if not columns or name in deleting:
                return None  # this table's rows are not placed in time: every interval may have changed
            for column in sorted(columns):
                statement = (
                    f"SELECT min({quote_identifier(column)}) FROM {_qualified(name)} WHERE {_newer_load(since_ms)}"
                )
                earliest = warehouse.query(statement)[0][0]
                if earliest is not None:
                    starts.append(_as_date(earliest))
    return min(starts) if starts else None


def _external_columns(context: Any, model_fqn: str, column: str, seen: set[tuple[str, str]] | None = None) -> dict:
    """The columns of external models that ``model_fqn.column`` is computed from, following views and models."""
    from sqlmesh.core.lineage import column_dependencies

    seen = seen if seen is not None else set()
    found: dict[str, set[str]] = {}
    if (model_fqn, column) in seen:
        return found
    seen.add((model_fqn, column))
    try:
        parents = column_dependencies(context, model_fqn, column)
    except Exception:  # noqa: BLE001 - an unparsable lineage means "unknown": the caller restates everything
        return found
    for parent, columns in parents.items():
        model = context.get_model(parent)
        if model is None:
            continue
        for parent_column in columns:
            if model.kind.is_external:
                found.setdefault(model.fqn, set()).add(parent_column)
            else:
                for fqn, cols in _external_columns(context, model.fqn, parent_column, seen).items():
                    found.setdefault(fqn, set()).update(cols)
    return found


def _tables_with_deletes() -> set[str]:
    """``dataset.table`` of every declared table whose pipeline removes rows (soft or hard deletes, or every table of
    a replication pipeline: the stream carries its deletes)."""
    from datamart.ingest.declarations import load_all
    from datamart.ingest.replication import is_replication

    return {
        f"{decl.dataset}.{table.name}"
        for decl in load_all()
        for table in decl.tables
        if table.deletes or is_replication(decl)
    }


def _newer_load(since_ms: int) -> str:
    """A condition on rows written by a dlt load created after ``since_ms`` (load ids are epoch seconds)."""
    return f"CAST(_dlt_load_id AS DOUBLE PRECISION) > {since_ms / 1000 - 1:.3f}"


def _qualified(name: str) -> str:
    return ".".join(quote_identifier(part) for part in name.split("."))


def _as_date(value: Any) -> Any:
    """A date from a date, a timestamp or an ISO string."""
    import datetime as dt

    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    return dt.date.fromisoformat(str(value)[:10])


def published_views(context: Any) -> list[str]:
    """The prod views of the published schema, as ``marts.<name>``."""
    return sorted(short_name(m.fqn) for m in context.models.values() if not m.kind.is_external and is_published(m.fqn))
