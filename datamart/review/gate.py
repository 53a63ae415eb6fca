"""The gate shared by review and promotion: a list of checks, each returning violations with a human message.

``make review`` runs every check of :data:`CHECKS` and reports each one in its own section; ``make promote`` (and
``make run``) runs the same checks before the prod plan and refuses to touch prod when one reports a violation.
Adding a check is one line in :data:`CHECKS`: ``Check("Personal data", my_check)``, where
``my_check(gate: GateInput) -> list[Violation]``; the report then has a "## Personal data" section listing its
violations (and ``details(gate) -> str`` Markdown if given), and promotion refuses what it refuses. A check module
imports :class:`GateInput` and :class:`Violation` from :mod:`datamart.review.base`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from datamart.privacy import lineage
from datamart.review import contract
from datamart.review.base import Check, GateInput, Violation
from datamart.settings import PROJECT_ROOT, Warehouse

__all__ = ["CHECKS", "Check", "GateError", "GateInput", "Violation", "enforce", "gate_input", "run_checks"]


CHECKS: list[Check] = [
    Check(contract.TITLE, contract.check_published_contract, contract.describe_published_columns),
    Check("Personal data", lineage.check_personal_data, lineage.describe_personal_data),
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
    """The input of every check for ``context`` against the prod environment recorded in its state."""
    return GateInput(
        context=context,
        prod_snapshots=prod_snapshots(context),
        forward_only=forward_only or set(),
        project=project or PROJECT_ROOT,
        warehouse=warehouse,
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
