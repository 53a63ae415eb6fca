"""Small-cell suppression: a published aggregate never shows a group computed from fewer people than the threshold.

The threshold is the SQLMesh variable ``small_cell_threshold`` (``variables`` in datamart/sqlmesh_config.py;
default 5). A model that
counts people (volunteers, applicants) per group of their attributes (department, birth decade…) computes its groups,
then sends every group under the threshold to one "other" group with ``@merge_small_cell``, re-aggregates, and drops
the "other" group itself if it is still under the threshold (``HAVING SUM(<people>) >= @small_cell_threshold()``).
The audit ``assert_no_small_cells`` (audits/) fails the model if any row still describes fewer people.
"""

from __future__ import annotations

from sqlglot import exp
from sqlmesh import macro
from sqlmesh.core.macros import MacroEvaluator

DEFAULT_SMALL_CELL_THRESHOLD = 5


@macro()
def small_cell_threshold(evaluator: MacroEvaluator) -> exp.Expr:
    """The smallest number of people a published group may describe (variable ``small_cell_threshold``, default 5)."""
    value = int(evaluator.var("small_cell_threshold", DEFAULT_SMALL_CELL_THRESHOLD))
    if value < 1:
        raise ValueError(f"variable small_cell_threshold must be at least 1 (config.yaml variables), not {value}")
    return exp.Literal.number(value)


@macro()
def merge_small_cell(evaluator: MacroEvaluator, people: exp.Expr, value: exp.Expr, other: exp.Expr) -> exp.Expr:
    """``value``, or ``other`` when the group counts fewer than the threshold of ``people``.

    Usage, per group of a first aggregation: ``@merge_small_cell(volunteers, department, 'other') AS department``;
    then group again on the merged columns and keep ``HAVING SUM(volunteers) >= @small_cell_threshold()``.
    """
    threshold = small_cell_threshold(evaluator)
    return exp.Case(ifs=[exp.If(this=exp.LT(this=people.copy(), expression=threshold), true=other.copy())]).else_(
        value.copy()
    )
