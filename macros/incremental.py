"""What an incremental-by-key mart recomputes: the keys dlt loaded, retired or deleted in the model's interval.

A refresh runs these marts over the interval since their last run (datamart/transform.py), and each finds its touched
keys with these conditions (models/marts/missions_v1.sql explains the whole approach):

- ``@loaded_in_interval()``: a row written by a dlt load that started in the interval. ``_dlt_load_id`` is the epoch
  second (with a fraction) at which the load started.
- ``@ended_in_interval(column)``: a deletion or a retirement (``ops.deleted_rows.deleted_at``, a history table's
  ``_dlt_valid_to``) in the interval, re-read for one day before it: a refresh running while another process deletes
  still sees the deletion afterwards (merging an unchanged key again costs nothing but the work).
- ``@first_build()``: the interval starts at the project's start (variable ``project_start``): a first build, or
  SQLMesh's restatement of such a model (always whole), which computes every key.
"""

from __future__ import annotations

from sqlglot import exp, parse_one
from sqlmesh import macro
from sqlmesh.core.macros import MacroEvaluator

# How far before its interval a refresh re-reads deletions and retirements (seconds).
REREAD_SECONDS = 86400


def _interval(evaluator: MacroEvaluator) -> tuple[float, float]:
    return float(evaluator.locals["start_epoch"]), float(evaluator.locals["end_epoch"])


@macro()
def loaded_in_interval(evaluator: MacroEvaluator) -> exp.Expr:
    """Rows written by a dlt load that started in the model's interval."""
    start, end = _interval(evaluator)
    return parse_one(f"_dlt_load_id::DOUBLE >= {start!r} AND _dlt_load_id::DOUBLE < {end!r}", dialect="duckdb")


@macro()
def ended_in_interval(evaluator: MacroEvaluator, column: exp.Expr) -> exp.Expr:
    """``column`` (a deletion or retirement time) in the model's interval, or up to one day before it."""
    start, end = _interval(evaluator)
    epoch = f"EXTRACT(EPOCH FROM {column.sql(dialect='duckdb')})"
    return parse_one(f"{epoch} >= {start - REREAD_SECONDS!r} AND {epoch} < {end!r}", dialect="duckdb")


@macro()
def first_build(evaluator: MacroEvaluator) -> exp.Expr:
    """Whether the interval starts at the project's start: every key is computed."""
    start = str(evaluator.locals["start_ds"])
    project_start = str(evaluator.var("project_start"))
    return exp.Boolean(this=start <= project_start)
