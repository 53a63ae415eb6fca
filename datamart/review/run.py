"""``make review``: build a branch in its own SQLMesh environment and compare it with prod, for a pull request."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datamart.gate.base import is_published, short_name
from datamart.gate.checks import CHECKS, Violation, gate_input, run_checks
from datamart.settings import DATA_DIR, PROJECT_ROOT, Warehouse
from datamart.transform import sqlmesh_context

DEFAULT_OUTPUT = DATA_DIR / "review" / "review.md"
SAMPLE_ROWS = 5


@dataclass
class ChangedModel:
    """A model the branch changes, with SQLMesh's category of the change."""

    name: str  # schema.table
    category: str  # breaking, non-breaking, indirect breaking, …, added, removed
    direct: bool
    published: bool
    forward_only: bool = False
    text_diff: str = ""


@dataclass
class DataDiff:
    """SQLMesh's table_diff of one changed published view, prod against the branch."""

    view: str
    prod_rows: int = 0
    branch_rows: int = 0
    only_prod: int = 0
    only_branch: int = 0
    matched: int = 0
    changed: int = 0  # rows joined on the grain with at least one different value
    column_match: dict[str, float] = field(default_factory=dict)  # % of joined rows equal, for columns below 100 %
    columns_added: list[str] = field(default_factory=list)
    columns_removed: list[str] = field(default_factory=list)
    sample_header: list[str] = field(default_factory=list)
    sample_rows: list[list[str]] = field(default_factory=list)
    note: str = ""


@dataclass
class CheckOutcome:
    """One gate check's result and its optional Markdown details."""

    title: str
    violations: list[Violation]
    details: str = ""


@dataclass
class ReviewResult:
    """Everything the report shows."""

    environment: str
    warehouse: str
    changes: list[ChangedModel] = field(default_factory=list)
    lineage_nodes: dict[str, str] = field(default_factory=dict)  # schema.table -> category
    lineage_edges: list[tuple[str, str]] = field(default_factory=list)
    checks: list[CheckOutcome] = field(default_factory=list)
    data_diffs: list[DataDiff] = field(default_factory=list)
    audits: list[tuple[str, list[str]]] = field(default_factory=list)  # built model -> its audits
    audit_failures: list[str] = field(default_factory=list)
    build_error: str = ""
    tests_run: int = 0
    test_failures: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def violations(self) -> list[Violation]:
        """Every violation of every gate check."""
        return [v for outcome in self.checks for v in outcome.violations]

    @property
    def passed(self) -> bool:
        """The pull request may be merged: no violation, the branch built with its audits, unit tests pass."""
        return not self.violations and not self.build_error and not self.test_failures


def default_environment(project: Path) -> str:
    """``pr_<branch>``: the CI's branch (``GITHUB_HEAD_REF``, ``CI_COMMIT_REF_NAME``) or the checked-out git branch."""
    branch = os.environ.get("GITHUB_HEAD_REF") or os.environ.get("CI_MERGE_REQUEST_SOURCE_BRANCH_NAME") or ""
    if not branch:
        try:
            branch = subprocess.run(
                ["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=project, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            branch = ""
    if branch in ("", "HEAD"):
        branch = "review"
    return "pr_" + re.sub(r"[^a-z0-9_]+", "_", branch.lower()).strip("_")


class _BuildFailures(logging.Handler):
    """Collect what SQLMesh's scheduler logs as failed: audits by name, other errors by model (the plan's own error
    only says "Plan application failed.")."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.audits: list[str] = []
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        from sqlmesh.utils.errors import NodeAuditsErrors

        error = record.exc_info[1] if record.exc_info else None
        node = getattr(error, "node", None)
        while error is not None:
            if isinstance(error, NodeAuditsErrors):
                self.audits.extend(str(audit) for audit in error.errors)
            elif error.__cause__ is None:
                where = (
                    f"{short_name(node.snapshot_name)}: " if node is not None and hasattr(node, "snapshot_name") else ""
                )
                message = where + " ".join(str(error).split())
                if message not in self.errors:
                    self.errors.append(message)
            error = error.__cause__


def run_review(
    warehouse: Warehouse, environment: str | None = None, project: Path | None = None, forward_only: bool = False
) -> ReviewResult:
    """Plan the project against prod in ``environment``, run the gate, build it, diff the data, run the tests."""
    from sqlmesh.utils.errors import SQLMeshError

    started = time.monotonic()
    project = project or PROJECT_ROOT
    environment = environment or default_environment(project)
    context = sqlmesh_context(warehouse, project)
    result = ReviewResult(environment=environment, warehouse=warehouse.describe())
    # Compare with prod even when the environment exists from an earlier push of the branch (SQLMesh would diff
    # against that environment): this context's config recreates it from prod.
    plan_config = context.config.plan.model_copy(update={"always_recreate_environment": True})
    context.config = context.config.model_copy(update={"plan": plan_config})
    # include_unmodified: every published view is in the environment (unchanged ones point at prod's tables), and a
    # branch identical to prod still gets its environment instead of an error
    # skip_linter: the linter's review gate would stop the build; the review reports the gate's checks instead
    # allow_destructive_models: SQLMesh refuses a forward-only change that drops a column of an incremental model
    # before any report exists; the review builds it in its own environment (a forward-only change gets a preview
    # table there, prod's tables are not touched) and the contract check refuses it by name. Promotion keeps
    # SQLMesh's own refusal.
    plan = context.plan_builder(
        environment,
        skip_tests=True,
        forward_only=forward_only or None,
        include_unmodified=True,
        skip_linter=True,
        allow_destructive_models=list(context.models),
    ).build()
    result.environment = plan.environment.name

    diff = plan.context_diff
    forward = {s.name for s in plan.new_snapshots if s.is_forward_only}
    result.changes = _changed_models(context, diff, forward)
    result.lineage_nodes, result.lineage_edges = _lineage(context, result.changes)

    gate = gate_input(context, project, forward, warehouse)
    found = run_checks(gate)
    for check in CHECKS:
        details = check.details(gate) if check.details else ""
        result.checks.append(CheckOutcome(check.title, found[check.title], details))

    built = [s for s in plan.new_snapshots if s.is_model and not s.is_external and not s.is_symbolic]
    result.audits = sorted((short_name(s.name), [name for name, _ in s.model.audits]) for s in built)
    collector = _BuildFailures()
    sqlmesh_logger = logging.getLogger("sqlmesh.core.scheduler")  # where failed nodes are logged, at INFO
    level = sqlmesh_logger.level
    sqlmesh_logger.addHandler(collector)
    sqlmesh_logger.setLevel(min(level or logging.INFO, logging.INFO))
    try:
        context.apply(plan)
    except SQLMeshError as exc:
        result.build_error = "\n".join(dict.fromkeys([*collector.errors, _error_chain(exc)]))
    finally:
        sqlmesh_logger.removeHandler(collector)
        sqlmesh_logger.setLevel(level)
    result.audit_failures = sorted(set(collector.audits))

    if not result.build_error:
        changed_views = [c.name for c in result.changes if c.published and c.category not in ("added", "removed")]
        result.data_diffs = _data_diffs(context, result.environment, changed_views)
        added = {c.name for c in result.changes if c.published and c.category == "added"}
        result.data_diffs += [_new_view(context, plan, s) for s in built if short_name(s.name) in added]

    stream = io.StringIO()
    tests = context.test(stream=stream)
    result.tests_run = tests.testsRun
    result.test_failures = [
        f"{test}: {_first_line(str(exc_info[1]))}"
        for test, exc_info in (*tests.original_failures, *tests.original_errors)
    ]
    result.elapsed = time.monotonic() - started
    return result


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("Failed to run test")]
    return " ".join(lines[:3])


def _error_chain(error: BaseException | None) -> str:
    """An exception and its causes, one per line (SQLMesh's plan error alone only says that it failed)."""
    messages: list[str] = []
    while error is not None:
        text = str(error).strip()
        if text and text not in messages:
            messages.append(text)
        error = error.__cause__ or error.__context__
    return "\n".join(messages)


def _category(snapshot: Any) -> str:
    if snapshot.change_category is None:
        return "uncategorized"
    return snapshot.change_category.name.lower().replace("_", " ").replace("non breaking", "non-breaking")


def _changed_models(context: Any, diff: Any, forward: set[str]) -> list[ChangedModel]:
    """Modified, added and removed models of the plan, with their category and text diff."""
    changes = []
    for name, (new, _old) in diff.modified_snapshots.items():
        if not new.is_model or new.is_external:
            continue
        direct = diff.directly_modified(name)
        changes.append(
            ChangedModel(
                short_name(name),
                _category(new),
                direct,
                is_published(name),
                forward_only=name in forward,
                text_diff=diff.text_diff(name) if direct else "",
            )
        )
    for snapshot_id in diff.added:
        snapshot = diff.snapshots[snapshot_id]
        if snapshot.is_model and not snapshot.is_external:
            changes.append(ChangedModel(short_name(snapshot.name), "added", True, is_published(snapshot.name)))
    for info in diff.removed_snapshots.values():
        if info.is_model:
            changes.append(ChangedModel(short_name(info.name), "removed", True, is_published(info.name)))
    return sorted(changes, key=lambda c: (not c.direct, c.name))


def _lineage(context: Any, changes: list[ChangedModel]) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """The changed models and every published view downstream of them, with the edges between them."""
    by_short = {short_name(fqn): fqn for fqn in context.models}
    nodes = {c.name: c.category for c in changes}
    for change in changes:
        fqn = by_short.get(change.name)
        if fqn is None:
            continue
        # the downstream models that lead to a published view (or are one), so the diagram stays connected
        for child in context.dag.downstream(fqn):
            leads_to_published = any(is_published(m) for m in [child, *context.dag.downstream(child)])
            if short_name(child) not in nodes and leads_to_published:
                nodes[short_name(child)] = "unchanged"
    edges = []
    for name in nodes:
        fqn = by_short.get(name)
        for parent in context.dag.graph.get(fqn, set()) if fqn else ():
            if short_name(parent) in nodes:
                edges.append((short_name(parent), name))
    return nodes, sorted(set(edges))


def _data_diffs(context: Any, environment: str, views: list[str]) -> list[DataDiff]:
    """SQLMesh's table_diff, prod against ``environment``, for each changed published view."""
    diffs = []
    for view in views:
        if not context.engine_adapter.table_exists(view):
            # taken away from Metabase: prod had published it past the gate (datamart/gate/published.py)
            note = "Not compared: prod's view was taken away (published past the review gate); promoting restores it."
            diffs.append(DataDiff(view, note=note))
            continue
        with _quiet_table_diff():
            found = context.table_diff(
                "prod",
                environment,
                select_models=[view],
                show=False,
                limit=SAMPLE_ROWS,
                warn_grain_check=True,
                skip_grain_check=True,
            )
        if not found:
            diffs.append(
                DataDiff(
                    view,
                    note="Not compared: prod and the branch share one physical table (e.g. a forward-only change).",
                )
            )
            continue
        table_diff = found[0]
        with _quiet_table_diff():
            schema = table_diff.schema_diff()
            rows = table_diff.row_diff(skip_grain_check=True)
        stats = rows.column_stats
        column_match = {}
        if stats is not None and not stats.empty and "pct_match" in stats.columns:
            column_match = {str(c): float(p) for c, p in stats["pct_match"].items() if float(p) < 100}
        sample = rows.joined_sample
        diffs.append(
            DataDiff(
                view,
                prod_rows=rows.source_count,
                branch_rows=rows.target_count,
                only_prod=rows.s_only_count,
                only_branch=rows.t_only_count,
                matched=rows.full_match_count,
                changed=rows.partial_match_count,
                column_match=column_match,
                columns_added=[name for name, _ in schema.added],
                columns_removed=[name for name, _ in schema.removed],
                sample_header=[_side(str(c), environment) for c in sample.columns] if column_match else [],
                sample_rows=[[_cell(v) for v in row] for row in sample.head(SAMPLE_ROWS).itertuples(index=False)]
                if column_match
                else [],
            )
        )
    return diffs


class _DropExecutedSql(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Executing SQL")


@contextmanager
def _quiet_table_diff() -> Iterator[None]:
    """SQLMesh's table_diff logs every query at the logger's effective level (WARNING): keep them off stderr."""
    adapter_logger = logging.getLogger("sqlmesh.core.engine_adapter.base")
    quiet = _DropExecutedSql()
    adapter_logger.addFilter(quiet)
    try:
        yield
    finally:
        adapter_logger.removeFilter(quiet)


def _new_view(context: Any, plan: Any, snapshot: Any) -> DataDiff:
    """A published view new in the branch: its row count there (prod has nothing to compare with)."""
    adapter = context.engine_adapter
    view = snapshot.qualified_view_name.for_environment(plan.environment.naming_info, adapter.dialect)
    rows = int(adapter.fetchone(f"SELECT count(*) FROM {view}")[0])
    name = short_name(snapshot.name)
    return DataDiff(name, branch_rows=rows, note=f"New published view: {rows} rows in the branch, none in prod.")


def _side(column: str, environment: str) -> str:
    """``PROD__name`` → ``prod: name`` and ``PR_X__name`` → ``branch: name`` (table_diff's sample headers)."""
    for prefix, label in (("PROD__", "prod"), (f"{environment.upper()}__", "branch")):
        if column.startswith(prefix):
            return f"{label}: {column[len(prefix) :]}"
    return column


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return "∅" if text in ("None", "nan", "NaT", "<NA>") else text.replace("|", "\\|")
