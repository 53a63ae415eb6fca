"""The gate on what prod publishes, whatever command published it: the contract recorded at the last good promotion,
and the personal-data lineage.

The linter rule ``reviewgate`` (linter/gate.py) stops a plan before anything is built, but any linter flag skips it
(``sqlmesh plan --skip-linter``). What no flag skips:

- **before every prod plan and run** (SQLMesh's ``before_all``, ``macros/published.py``, wired in
  ``datamart/sqlmesh_config.py``): the models prod would serve after the plan are checked — :data:`CHECKS` of
  ``datamart/gate/checks.py`` against the contract recorded below — and a violation stops the plan before its first
  stage (no snapshot recorded, no table built, no view swapped);
- **after every prod plan and run** (``after_all``): the published views' columns are recorded in
  ``ops.published_contract``, the contract of the last good promotion (a plan that got there passed the check);
- **the repository's commands** (``python -m datamart scheduled`` and ``promote``, datamart/transform.py): prod's
  own models are checked the same way before anything else, because a plan run with another configuration (a
  checkout from before this gate, a hand-made config) applies without the hooks. A published view that breaks the
  recorded contract or shows a personal column is dropped from the published schema (Metabase's role reads nothing
  else), and the command fails (the scheduled run alerts); a promotion of a project that passes the gate then
  publishes the views again.

The contract compared with is the recorded one, not SQLMesh's prod state: after a plan that skipped the gate, prod's
state is the broken version, and the documented way back (restore the model, ``make review``, ``make promote``)
must compare with what Metabase's questions were built on.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlglot import exp, parse_one

from datamart.gate.base import GateInput, Violation, is_published, short_name
from datamart.gate.checks import prod_snapshots, run_checks
from datamart.gate.contract import (
    CONTRACT_COLUMNS,
    CONTRACT_SCHEMA,
    CONTRACT_TABLE,
    Contract,
    contract_of_adapter,
    contract_of_warehouse,
    model_columns,
)
from datamart.settings import PROJECT_ROOT, quote_identifier


class PublishedGateError(RuntimeError):
    """What prod would publish (or publishes) breaks the gate; the message lists each violation and the way back."""

    def __init__(self, violations: list[Violation], taken_away: list[str] | None = None, planned: bool = True) -> None:
        self.violations = violations
        self.taken_away = taken_away or []
        lines = [f"  - [{v.check}] {v.message}" for v in violations]
        if planned:
            head = f"{len(violations)} change(s) refused by the review gate before the prod plan, prod was not touched"
        else:
            head = f"prod publishes {len(violations)} violation(s) of the review gate (applied past the gate)"
        tail = []
        if self.taken_away:
            tail.append(f"Taken away from Metabase (dropped from the published schema): {', '.join(self.taken_away)}.")
        if not planned:
            tail.append(
                "Way back: restore the models (or fix them as each line says), then `make review` and `make promote` "
                "(compared with the contract of the last good promotion, ops.published_contract): the views are "
                "published again."
            )
        super().__init__("\n".join([head + ":", *lines, *tail]))


class ModelSet:
    """What the checks read of a SQLMesh context, for models taken from snapshots: ``models`` by fqn."""

    def __init__(self, models: dict[str, Any]) -> None:
        self.models = models


def snapshot_models(snapshots: Iterable[Any]) -> dict[str, Any]:
    """The models of ``snapshots`` (a plan's or an environment's), by fqn."""
    return {s.name: s.model for s in snapshots if s.is_model}


def published_columns(models: dict[str, Any]) -> Contract:
    """The columns and types of every published model of ``models`` (those SQLMesh can derive)."""
    found = {}
    for fqn, model in models.items():
        if is_published(fqn) and not model.kind.is_external:
            columns = model_columns(model)
            if columns is not None:
                found[short_name(fqn)] = columns
    return found


def record_statements(models: dict[str, Any], dialect: str) -> list[exp.Expr]:
    """The statements replacing the recorded contract with the published columns of ``models``, in one transaction
    (SQLMesh runs an after_all's statements in one)."""
    ddl = ", ".join(f"{name} {sql_type}" for name, (sql_type, _) in CONTRACT_COLUMNS.items())
    table = f"{CONTRACT_SCHEMA}.{CONTRACT_TABLE}"
    statements = [
        f"CREATE SCHEMA IF NOT EXISTS {CONTRACT_SCHEMA}",
        f"CREATE TABLE IF NOT EXISTS {table} ({ddl})",
        f"DELETE FROM {table}",
    ]
    rows = [
        (view, column, position, data_type)
        for view, columns in sorted(published_columns(models).items())
        for position, (column, data_type) in enumerate(columns.items(), 1)
    ]
    if rows:
        values = ", ".join(f"({_text(v)}, {_text(c)}, {p}, {_text(t)}, CURRENT_TIMESTAMP)" for v, c, p, t in rows)
        statements.append(f"INSERT INTO {table} ({', '.join(CONTRACT_COLUMNS)}) VALUES {values}")
    return [parse_one(s, dialect=dialect) for s in statements]


def _text(value: str) -> str:
    return exp.Literal.string(value).sql()


def violations(models: dict[str, Any], contract: Contract | None, project: Path | None = None) -> list[Violation]:
    """The gate's violations for ``models`` published in prod, against ``contract`` (None: no contract recorded
    yet, only the personal-data lineage is checked)."""
    gate = GateInput(context=ModelSet(models), project=project or PROJECT_ROOT, contract=contract)
    return [v for found in run_checks(gate).values() for v in found]


def refuse_plan(snapshots: Iterable[Any], adapter: Any) -> None:
    """before_all of a prod plan or run: raise :class:`PublishedGateError` when the models prod would serve break
    the gate (nothing is applied: the hook runs before the plan's first stage)."""
    found = violations(snapshot_models(snapshots), contract_of_adapter(adapter))
    if found:
        raise PublishedGateError(found)


def take_away_violations(
    context: Any, warehouse: Any, project: Path | None = None
) -> tuple[list[Violation], list[str]]:
    """Check the models prod serves now (SQLMesh's state) against the recorded contract and the lineage; drop each
    published view concerned from the published schema (Metabase reads nothing else). The violations and the views
    dropped."""
    prod = prod_snapshots(context)
    if not prod:
        return [], []
    models = {fqn: s.model for fqn, s in prod.items()}
    found = violations(models, contract_of_warehouse(warehouse), project)
    published = {short_name(fqn) for fqn in models if is_published(fqn)}
    dropped = []
    for view in sorted({v.model for v in found} & published):
        schema, name = view.split(".")
        # no CASCADE: a published view is read by Metabase only, never by another model
        warehouse.query(f"DROP VIEW IF EXISTS {quote_identifier(schema)}.{quote_identifier(name)}")
        dropped.append(view)
    return found, dropped
