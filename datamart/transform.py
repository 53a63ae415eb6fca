"""SQLMesh on the same warehouse as dlt: build the datamart and promote it to prod."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlmesh.utils.errors import AuditError, NodeAuditsErrors, PlanError, SQLMeshError

from datamart.grants import GrantReport, apply_metabase_grants
from datamart.ingest.ops import ensure_ops_tables
from datamart.review.gate import enforce
from datamart.settings import PROJECT_ROOT, PUBLISHED_SCHEMA, Warehouse, quote_identifier


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


def sqlmesh_context(warehouse: Warehouse, project: Path | None = None, **kwargs: Any) -> Any:
    """A SQLMesh Context on this project (or a copy of it at ``project``), connected to ``warehouse``."""
    warehouse.export_for_sqlmesh()
    from sqlmesh import Context

    return Context(paths=[str(project or PROJECT_ROOT)], **kwargs)


def apply_prod(warehouse: Warehouse, project: Path | None = None) -> TransformRun:
    """Apply model changes to prod, then rebuild what reads raw data loaded since prod was last built.

    First the review gate (``datamart.review.gate.CHECKS``, the contract of the published views) runs against what
    prod serves: a refused change raises ``GateError`` before anything is planned, and prod is not touched.

    A prod plan rebuilds only changed models. Data loaded by dlt since the last prod plan (by this command or by
    ``dlt pipeline <name> run`` alone) is found in each raw dataset's ``_dlt_loads`` table; the external models of
    those datasets are restated (SQLMesh restates everything downstream of them, one model after the other, each in
    one transaction). A failing audit raises a :class:`PromotionError` naming the model and the audit, before the
    views are swapped and before the models downstream of it are rebuilt: those keep serving their previous data.
    """
    started = time.monotonic()
    ensure_ops_tables(warehouse)  # marts.data_freshness_v1 reads them, even before any pipeline ran
    context = sqlmesh_context(warehouse, project)
    enforce(context, project, warehouse)
    prod = context.state_reader.get_environment("prod")
    with audits_named_on_failure():
        return _apply_prod(warehouse, context, prod, started)


def _apply_prod(warehouse: Warehouse, context: Any, prod: Any, started: float) -> TransformRun:
    result = TransformRun()
    plan = context.plan("prod", auto_apply=True, no_prompts=True)
    built = {s.name: s for s in plan.new_snapshots}
    if prod is not None and prod.finalized_ts:
        externals = [_short_name(m.fqn) for m in context.models.values() if m.kind.is_external]
        fresh = datasets_loaded_since(warehouse, {e.split(".")[0] for e in externals}, prod.finalized_ts)
        restate = sorted(e for e in externals if e.split(".")[0] in fresh)
        if restate:
            plan = context.plan("prod", auto_apply=True, no_prompts=True, restate_models=restate)
            built.update({plan.snapshots[sid].name: plan.snapshots[sid] for sid in plan.restatements})
    models = [s for s in built.values() if s.is_model and not s.is_external and not s.is_symbolic]
    result.models_built = sorted(_short_name(s.name) for s in models)
    result.audits_passed = sum(len(s.model.audits) for s in models)
    result.published_views = published_views(context)
    result.grants = apply_metabase_grants(warehouse)  # after every promotion: a view swap drops the views' grants
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
        lines = [
            f"model {e.model_name or '?'}: audit {e.audit_name} failed on {e.count} row(s); the rows: {e.sql()}"
            for e in failed
        ]
        raise PromotionError(
            "the prod plan stopped on failing audits, the models that depend on them were not rebuilt and the "
            "published views keep their previous data:\n"
            + "\n".join(lines)
            + "\nFix the source data (the next run loads the corrected rows) or the model, then run again."
        ) from exc
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


def _short_name(fqn: str) -> str:
    """``schema.table`` from a fully qualified, quoted SQLMesh name (``"catalog"."schema"."table"``)."""
    return ".".join(fqn.replace('"', "").split(".")[-2:])


def published_views(context: Any) -> list[str]:
    """The prod views of the published schema, as ``marts.<name>``."""
    names = []
    for model in context.models.values():
        if model.kind.is_external:
            continue
        schema_table = _short_name(model.fqn)
        if schema_table.split(".")[0] == PUBLISHED_SCHEMA:
            names.append(schema_table)
    return sorted(names)
