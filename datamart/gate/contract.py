"""The contract of the published views: what Metabase reads may gain columns, never lose, rename or retype one.

The comparison is against what prod serves: the contract recorded by the last good promotion
(``ops.published_contract``, datamart/gate/published.py) or, before any was recorded, the columns of each published
model in the prod environment's snapshots (SQLMesh's record of the views it swapped in); never against git. A change
that needs to drop, rename or retype a column publishes a new version beside the old one (``missions_v2`` next to
``missions_v1``). A published view
disappears only when it is declared retired in ``retired_views.yaml`` at the project root::

    retired_views:
      - view: marts.missions_v1
        replaced_by: marts.missions_v2
        reason: Metabase questions moved to v2 (announced 2026-11-02)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from datamart.gate.base import GateInput, Violation, is_published, short_name
from datamart.ingest.ops import OPS_SCHEMA
from datamart.settings import PUBLISHED_SCHEMA, SettingsError

TITLE = "Contract of the published views"
RETIRED_FILE = "retired_views.yaml"

# The contract recorded by the last good promotion (written by datamart/gate/published.py)
CONTRACT_SCHEMA = OPS_SCHEMA
CONTRACT_TABLE = "published_contract"
CONTRACT_COLUMNS: dict[str, tuple[str, str]] = {
    "view_name": ("TEXT", "Published view (marts.<name>) as the last good promotion left it."),
    "column_name": ("TEXT", "One of its columns."),
    "position": ("BIGINT", "The column's position in the view (1 = first)."),
    "data_type": ("TEXT", "The column's type, as SQLMesh derives it."),
    "recorded_at": ("TIMESTAMPTZ", "When the promotion that recorded it ended (UTC)."),
}
#: The view's columns and types, by published view (``marts.<name>``).
Contract = dict[str, dict[str, str]]


class RetiredDeclarationError(SettingsError):
    """``retired_views.yaml`` is malformed; the message names the entry and the fix."""


@dataclass(frozen=True)
class ColumnChange:
    """One column of a published view that differs from prod."""

    kind: str  # added, removed, renamed, retyped
    column: str  # the column as prod serves it (the new one for ``added``)
    old_type: str = ""
    new_type: str = ""
    new_name: str = ""  # for ``renamed``

    @property
    def breaking(self) -> bool:
        """Whether a Metabase question using this column would break."""
        return self.kind != "added"

    def describe(self) -> str:
        """The change in a few words, for the report's table."""
        if self.kind == "added":
            return f"`{self.column}` added ({self.new_type})"
        if self.kind == "removed":
            return f"`{self.column}` removed (was {self.old_type})"
        if self.kind == "renamed":
            return f"`{self.column}` renamed to `{self.new_name}`"
        return f"`{self.column}` retyped {self.old_type} → {self.new_type}"


@dataclass
class ViewComparison:
    """A published view in prod and/or in the project under review."""

    view: str  # marts.<name>
    status: str  # unchanged, changed, new, removed, retired
    changes: list[ColumnChange] = field(default_factory=list)
    forward_only: bool = False
    unknown_columns: bool = False  # the project's columns could not be derived
    previous_version: str = ""  # for a new ``<name>_vN``: the ``<name>_v(N-1)`` prod serves, compared in ``changes``


def retired_views(project: Path) -> dict[str, dict[str, str]]:
    """The declared retirements of ``project/retired_views.yaml``, by view (``marts.<name>``); empty if no file."""
    path = project / RETIRED_FILE
    if not path.exists():
        return {}
    document = yaml.safe_load(path.read_text()) or {}
    entries = document.get("retired_views") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise RetiredDeclarationError(
            f"{RETIRED_FILE}: expected a list under `retired_views:` (see docs/review-and-promotion.md)."
        )
    retired = {}
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or not entry.get("view") or not entry.get("reason"):
            raise RetiredDeclarationError(
                f"{RETIRED_FILE}: entry {number} needs `view: marts.<name>` and `reason: <why, for whom>`."
            )
        view = str(entry["view"]).lower()
        if "." not in view:
            view = f"{PUBLISHED_SCHEMA}.{view}"
        retired[view] = {k: str(v) for k, v in entry.items()}
    return retired


def model_columns(model: Any) -> dict[str, str] | None:
    """A model's output columns and their types as SQL text, or None when SQLMesh cannot derive them."""
    columns = model.columns_to_types
    if not columns:
        return None
    return {name: dtype.sql(dialect=model.dialect or "duckdb").upper() for name, dtype in columns.items()}


def _columns(published: Any) -> dict[str, str] | None:
    """The columns of prod's side: a recorded contract's (already a mapping) or a model's."""
    return dict(published) if isinstance(published, dict) else model_columns(published)


def _known(dtype: str) -> bool:
    return dtype not in ("UNKNOWN", "NULL", "")


def column_changes(prod: dict[str, str], branch: dict[str, str]) -> list[ColumnChange]:
    """Added, removed, renamed and retyped columns from prod's columns to the branch's, in prod's order.

    A removed column and an added column at the same position with the same type are reported as a rename.
    """
    added = [c for c in branch if c not in prod]
    prod_order, branch_order = list(prod), list(branch)
    changes: list[ColumnChange] = []
    for column in prod:
        if column in branch:
            if prod[column] != branch[column] and _known(prod[column]) and _known(branch[column]):
                changes.append(ColumnChange("retyped", column, prod[column], branch[column]))
            continue
        position = prod_order.index(column)
        twin = next(
            (
                a
                for a in added
                if position < len(branch_order) and branch_order[position] == a and branch[a] == prod[column]
            ),
            None,
        )
        if twin is not None:
            added.remove(twin)
            changes.append(ColumnChange("renamed", column, prod[column], branch[twin], new_name=twin))
        else:
            changes.append(ColumnChange("removed", column, old_type=prod[column]))
    changes.extend(ColumnChange("added", column, new_type=branch[column]) for column in added)
    return changes


def compare_published(gate: GateInput) -> list[ViewComparison]:
    """Every published view of prod and of the project, with its column changes against prod."""
    branch = {fqn: m for fqn, m in gate.context.models.items() if is_published(fqn) and not m.kind.is_external}
    if gate.contract is not None:
        # what the last good promotion published (datamart/gate/published.py), not a prod applied past the gate
        by_view = {short_name(fqn): fqn for fqn in branch}
        prod: dict[str, Any] = {by_view.get(view, view): columns for view, columns in gate.contract.items()}
    else:
        prod = {
            fqn: s.model for fqn, s in gate.prod_snapshots.items() if is_published(fqn) and not s.model.kind.is_external
        }
    retired = retired_views(gate.project)
    comparisons = []
    for fqn in sorted(prod.keys() | branch.keys(), key=short_name):
        view = short_name(fqn)
        if fqn not in branch:
            comparisons.append(ViewComparison(view, "retired" if view in retired else "removed"))
            continue
        if fqn not in prod:
            comparisons.append(_new_view(view, branch[fqn], prod))
            continue
        old, new = _columns(prod[fqn]), model_columns(branch[fqn])
        if new is None or old is None:
            comparisons.append(ViewComparison(view, "unchanged", unknown_columns=new is None and old is not None))
            continue
        changes = column_changes(old, new)
        comparisons.append(
            ViewComparison(view, "changed" if changes else "unchanged", changes, forward_only=fqn in gate.forward_only)
        )
    return comparisons


def read_contract(exists: bool, fetchall: Callable[[str], list[tuple]]) -> Contract | None:
    """The recorded contract (None when none was recorded yet); ``fetchall`` runs a query on the warehouse."""
    if not exists:
        return None
    rows = fetchall(
        f"SELECT view_name, column_name, data_type FROM {CONTRACT_SCHEMA}.{CONTRACT_TABLE} ORDER BY view_name, position"
    )
    if not rows:
        return None
    contract: Contract = {}
    for view, column, data_type in rows:
        contract.setdefault(str(view), {})[str(column)] = str(data_type)
    return contract


def contract_of_adapter(adapter: Any) -> Contract | None:
    """The recorded contract through a SQLMesh engine adapter (the linter's context, a before_all macro)."""
    return read_contract(adapter.table_exists(f"{CONTRACT_SCHEMA}.{CONTRACT_TABLE}"), adapter.fetchall)


def contract_of_warehouse(warehouse: Any) -> Contract | None:
    """The recorded contract of ``warehouse`` (datamart.settings.Warehouse)."""
    return read_contract(warehouse.table_exists(CONTRACT_SCHEMA, CONTRACT_TABLE), warehouse.query)


def _previous_version(view: str) -> str:
    """``marts.missions_v1`` for ``marts.missions_v2``; empty when the name carries no version above 1."""
    base, _, version = view.rpartition("_v")
    return f"{base}_v{int(version) - 1}" if base and version.isdigit() and int(version) > 1 else ""


def _new_view(view: str, model: Any, prod: dict[str, Any]) -> ViewComparison:
    """A view new in the project; a new version is compared with the previous one, for the reviewer (not a rule)."""
    comparison = ViewComparison(view, "new")
    previous = _previous_version(view)
    old_model = next((m for fqn, m in prod.items() if short_name(fqn) == previous), None)
    old, new = (_columns(old_model) if old_model is not None else None), model_columns(model)
    if old is not None and new is not None:
        comparison.previous_version = previous
        comparison.changes = column_changes(old, new)
    return comparison


def _way_out(view: str) -> str:
    schema, name = view.split(".")
    base, _, version = name.rpartition("_v")
    if base and version.isdigit():
        new_view = f"{schema}.{base}_v{int(version) + 1}"
        new_file = f"models/{schema}/{base}_v{int(version) + 1}.sql"
    else:
        new_view, new_file = f"{view}_v2", f"models/{schema}/{name}_v2.sql"
    return (
        f"Keep {view} as prod serves it and publish the change as {new_view} beside it ({new_file}); "
        f"retire {view} later on purpose in {RETIRED_FILE}."
    )


def check_published_contract(gate: GateInput) -> list[Violation]:
    """The contract rule as violations: lost, renamed or retyped columns, and published views removed undeclared."""
    violations = []
    for comparison in compare_published(gate):
        view = comparison.view
        if comparison.status == "removed":
            message = (
                f"{view}: the published view would disappear but is not declared retired. Metabase questions on it "
                f"would break. Either keep its model, or declare `- view: {view}` with a `reason:` in "
                f"{RETIRED_FILE} once its readers have moved."
            )
            violations.append(Violation(view, message))
            continue
        if comparison.status == "new":
            continue  # a new view (or a new version beside the old one) breaks no reader
        if comparison.unknown_columns:
            message = (
                f"{view}: SQLMesh cannot derive the columns of the changed model, so the contract cannot be checked. "
                "End the model with an explicit column list (no SELECT *) whose types SQLMesh can infer."
            )
            violations.append(Violation(view, message))
        how = " (a forward-only change: SQLMesh would ALTER the prod table in place)" if comparison.forward_only else ""
        for change in comparison.changes:
            if not change.breaking:
                continue
            what = {
                "removed": f"column `{change.column}` would be removed",
                "renamed": f"column `{change.column}` would be renamed to `{change.new_name}`",
                "retyped": f"column `{change.column}` would change type from {change.old_type} to {change.new_type}",
            }[change.kind]
            message = f"{view}: {what}{how}; Metabase questions using it would break. {_way_out(view)}"
            violations.append(Violation(view, message, column=change.column))
    return violations


def describe_published_columns(gate: GateInput) -> str:
    """A Markdown table of every published view: its status and column changes against prod."""
    lines = ["| published view | against prod | column changes |", "|---|---|---|"]
    for comparison in compare_published(gate):
        status = comparison.status
        if comparison.status == "changed":
            status = "❌ breaking" if any(c.breaking for c in comparison.changes) else "✅ columns added"
        elif comparison.status == "removed":
            status = "❌ removed, not declared retired"
        elif comparison.status == "retired":
            status = f"retired on purpose ({RETIRED_FILE})"
        elif comparison.status == "new":
            status = "✅ new view"
        changes = "<br>".join(c.describe() for c in comparison.changes) or "—"
        if comparison.previous_version:
            changes = f"against `{comparison.previous_version}`, which stays: {changes}"
        if comparison.forward_only:
            changes += " (forward-only)"
        lines.append(f"| `{comparison.view}` | {status} | {changes} |")
    return "\n".join(lines)
