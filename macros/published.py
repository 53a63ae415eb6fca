"""The review gate where no linter flag reaches it: SQLMesh's ``before_all`` / ``after_all`` of every plan and run.

``sqlmesh plan --skip-linter`` skips the ``reviewgate`` rule (linter/gate.py), not these: the config
(datamart/sqlmesh_config.py) runs ``@published_gate()`` at the start of every ``sqlmesh plan`` and ``sqlmesh run``
and ``@record_published_contract()`` at their end. In prod only (dev environments are not published):

- ``@published_gate()`` checks the models prod would serve after the plan (SQLMesh hands the macro the plan's
  snapshots) against the contract recorded by the last good promotion and the personal-data lineage, and raises
  before the plan's first stage: nothing recorded, built or swapped. datamart/gate/published.py has the details.
- ``@record_published_contract()`` records the published views' columns once the plan or run got there (it passed
  the gate), as the contract the next one is compared with.
"""

from __future__ import annotations

from sqlglot import exp
from sqlmesh import macro
from sqlmesh.core.macros import MacroEvaluator, RuntimeStage

PROD = "prod"


def _nothing() -> list[exp.Expr]:
    """A statement that does nothing: SQLMesh logs a warning for a before_all statement that renders to none."""
    return [exp.select(exp.Literal.number(1))]


@macro()
def published_gate(evaluator: MacroEvaluator) -> list[exp.Expr]:
    """before_all: refuse a prod plan or run whose published models break the review gate."""
    if evaluator.runtime_stage != RuntimeStage.BEFORE_ALL.value or evaluator.this_env != PROD:
        return _nothing()
    from datamart.gate.published import refuse_plan

    refuse_plan(evaluator.snapshots.values(), evaluator.engine_adapter)
    return _nothing()


@macro()
def record_published_contract(evaluator: MacroEvaluator) -> list[exp.Expr]:
    """after_all: record the columns prod publishes as the contract of the last good promotion."""
    if evaluator.runtime_stage != RuntimeStage.AFTER_ALL.value or evaluator.this_env != PROD:
        return _nothing()
    from datamart.gate.published import record_statements, snapshot_models

    return record_statements(snapshot_models(evaluator.snapshots.values()), evaluator.dialect)
