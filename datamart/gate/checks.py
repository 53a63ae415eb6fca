"""The gate shared by review and promotion: a list of checks, each returning violations with a human message.

``make review`` runs every check of :data:`CHECKS` and reports each one in its own section; ``make promote`` (and
``make run``) runs the same checks before the prod plan and refuses to touch prod when one reports a violation.
Adding a check is one line in :data:`CHECKS`: ``Check("Personal data", my_check)``, where
``my_check(gate: GateInput) -> list[Violation]``; the report then has a "## Personal data" section listing its
violations (and ``details(gate) -> str`` Markdown if given), and promotion refuses what it refuses. A check module
imports :class:`GateInput` and :class:`Violation` from :mod:`datamart.gate.base`.

The same checks run inside SQLMesh: the project's linter rule ``reviewgate`` (``linter/gate.py``, an error-level rule
of ``datamart/sqlmesh_config.py``) reports :func:`violations_by_model`, and SQLMesh lints before every plan, so a
plain ``sqlmesh plan`` (prod or any environment) refuses what ``make review`` refuses, with the same messages.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

from datamart.gate import contract, lineage, small_cells
from datamart.gate.base import Check, GateInput, Violation, short_name
from datamart.settings import PROJECT_ROOT, Warehouse

__all__ = [
    "CHECKS",
    "Check",
    "GateError",
    "GateInput",
    "Violation",
    "enforce",
    "gate_input",
    "lint_message",
    "run_checks",
    "violations_by_model",
]


CHECKS: list[Check] = [
    Check(contract.TITLE, contract.check_published_contract, contract.describe_published_columns),
    Check("Personal data", lineage.check_personal_data, lineage.describe_personal_data),
    Check("Small cells", small_cells.check_small_cells, small_cells.describe_small_cells),
]


class GateError(RuntimeError):
    """A change the gate refuses; the message lists every violation and its way out."""

    def __init__(self, violations: list[Violation]) -> None:
        self.violations = violations
        lines = [f"  - [{v.check}] {v.message}" for v in violations]
        super().__init__(
            f"{len(violations)} change(s) refused by the review gate, prod was not touched:\n" + "\n".join(lines)
        )


def prod_snapshots(context: Any) -> dict[str, Any]:
    """The full snapshot (with its model) of every model prod serves, by fqn; empty before the first promotion."""
    prod = context.state_reader.get_environment("prod")
    if prod is None:
        return {}
    snapshots = context.state_reader.get_snapshots(prod.snapshots)
    return {s.name: s for s in snapshots.values() if s.is_model}


def gate_input(
    context: Any,
    project: Path | None = None,
    forward_only: set[str] | None = None,
    warehouse: Warehouse | None = None,
) -> GateInput:
    """The input of every check for ``context`` against the prod environment recorded in its state, and the contract
    recorded by the last good promotion when there is one (datamart/gate/published.py)."""
    return GateInput(
        context=context,
        prod_snapshots=prod_snapshots(context),
        forward_only=forward_only or set(),
        project=project or PROJECT_ROOT,
        warehouse=warehouse,
        contract=contract.contract_of_adapter(context.engine_adapter),
    )


def run_checks(gate: GateInput, checks: list[Check] | None = None) -> dict[str, list[Violation]]:
    """Every check's violations, by check title (in the order of :data:`CHECKS`)."""
    found = {}
    for check in CHECKS if checks is None else checks:
        found[check.title] = [replace(v, check=v.check or check.title) for v in check.run(gate)]
    return found


def enforce(context: Any, project: Path | None = None, warehouse: Warehouse | None = None) -> None:
    """Raise :class:`GateError` when any check refuses the project ``context`` would promote (promotion's guard)."""
    violations = [v for found in run_checks(gate_input(context, project, warehouse=warehouse)).values() for v in found]
    if violations:
        raise GateError(violations)


def lint_message(violation: Violation) -> str:
    """A violation as ``make review`` and ``make promote`` word it, for SQLMesh's linter output."""
    return f"[{violation.check}] {violation.message} (refused by the review gate: `make review` has the full report)"


# One gate run per lint pass: SQLMesh calls the rule once per model, the checks look at the whole project.
# Weak keys: a context that is closed and dropped takes its entry with it.
_lint_cache: WeakKeyDictionary[Any, tuple[tuple[Any, ...], dict[str, list[Violation]]]] = WeakKeyDictionary()


def violations_by_model(context: Any) -> dict[str, list[Violation]]:
    """The gate's violations for the project ``context`` holds against its prod, by the fqn of the model to report
    them on: the model concerned, or (a published view removed from the project, a raw table) the first model."""
    prod = context.state_reader.get_environment("prod")
    key = (tuple(sorted((fqn, id(m)) for fqn, m in context.models.items())), prod.plan_id if prod else None)
    cached = _lint_cache.get(context)
    if cached is not None and cached[0] == key:
        return cached[1]
    found: dict[str, list[Violation]] = {}
    models = {short_name(fqn): fqn for fqn, m in context.models.items() if not m.kind.is_external}
    fallback = min(models.values()) if models else ""
    violations = [v for checks in run_checks(gate_input(context, Path(context.path))).values() for v in checks]
    for violation in violations:
        found.setdefault(models.get(violation.model, fallback), []).append(violation)
    _lint_cache[context] = (key, found)
    return found
