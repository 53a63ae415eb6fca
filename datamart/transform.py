"""SQLMesh on the same warehouse as dlt: build the datamart and promote it to prod."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from datamart.settings import PROJECT_ROOT, Warehouse

PUBLISHED_SCHEMA = "marts"


@dataclass
class TransformRun:
    """What one prod plan did."""

    models_built: list[str] = field(default_factory=list)
    audits_passed: int = 0
    published_views: list[str] = field(default_factory=list)
    elapsed: float = 0.0


def sqlmesh_context(warehouse: Warehouse, **kwargs: Any) -> Any:
    """A SQLMesh Context on this project, connected to ``warehouse`` through config.yaml's environment variables."""
    warehouse.export_for_sqlmesh()
    from sqlmesh import Context

    return Context(paths=[str(PROJECT_ROOT)], **kwargs)


def apply_prod(warehouse: Warehouse, refreshed_sources: list[str]) -> TransformRun:
    """Apply model changes to prod, then rebuild what reads the raw tables that received rows this run.

    A prod plan rebuilds only changed models; models whose inputs received new rows are restated (SQLMesh accepts
    external models in ``restate_models`` and restates everything downstream of them). A failing audit raises before
    the views are swapped, so prod keeps serving the previous version.
    """
    started = time.monotonic()
    context = sqlmesh_context(warehouse)
    result = TransformRun()
    prod_existed = context.state_reader.get_environment("prod") is not None
    plan = context.plan("prod", auto_apply=True, no_prompts=True)
    built = {s.name: s for s in plan.new_snapshots}
    known_sources = {_external_name(m) for m in context.models.values() if m.kind.is_external}
    restate = sorted(set(refreshed_sources) & known_sources)
    if prod_existed and restate:
        plan = context.plan("prod", auto_apply=True, no_prompts=True, restate_models=restate)
        built.update({plan.snapshots[sid].name: plan.snapshots[sid] for sid in plan.restatements})
    models = [s for s in built.values() if s.is_model and not s.is_external and not s.is_symbolic]
    result.models_built = sorted(_short_name(s.name) for s in models)
    result.audits_passed = sum(len(s.model.audits) for s in models)
    result.published_views = published_views(context)
    result.elapsed = time.monotonic() - started
    return result


def _short_name(fqn: str) -> str:
    """``schema.table`` from a fully qualified, quoted SQLMesh name (``"catalog"."schema"."table"``)."""
    return ".".join(fqn.replace('"', "").split(".")[-2:])


def _external_name(model: Any) -> str:
    """``raw_app_db.organizations`` for an external model, whatever catalog SQLMesh qualified it with."""
    return _short_name(model.fqn)


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
