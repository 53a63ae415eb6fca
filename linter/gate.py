"""The review gate inside SQLMesh: a plain `sqlmesh plan` refuses what `make review` and `make promote` refuse.

SQLMesh loads the `Rule` subclasses of this folder and runs the rules listed in the config's `linter.rules`
(datamart/sqlmesh_config.py) before every plan (`sqlmesh plan`, prod or any environment) and on `sqlmesh lint`; an
error-level violation stops the plan before anything is built or promoted. The checks are datamart/gate/checks.py's
CHECKS (the contract of the published views, personal data), compared with what prod serves in SQLMesh's state.
"""

from __future__ import annotations

from sqlmesh.core.linter.rule import Rule, RuleViolation
from sqlmesh.core.model import Model

from datamart.gate.checks import lint_message, violations_by_model


class ReviewGate(Rule):
    """A published view keeps its columns and types (or a new version is published beside it), and no published
    column carries personal data without an allowance: the review gate of `make review` (datamart/gate/checks.py)."""

    def check_model(self, model: Model) -> list[RuleViolation] | None:
        found = violations_by_model(self.context).get(model.fqn, [])
        return [self.violation(lint_message(v)) for v in found] or None
