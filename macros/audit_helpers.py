"""Macros used by the project's audits (audits/*.sql)."""

from __future__ import annotations

from sqlglot import exp
from sqlmesh import macro
from sqlmesh.core.macros import MacroEvaluator


@macro()
def is_audited_table(evaluator: MacroEvaluator, model: exp.Expr) -> exp.Expr:
    """A condition selecting the audited table's rows in ``information_schema.columns``.

    ``@this_model`` is the physical table (``sqlmesh__marts.marts__missions_v1__123``) for most models, and a subquery
    ``(SELECT * FROM <physical table> WHERE <time range>)`` for incremental ones: either way the table is found inside.
    ``information_schema.columns`` has the same shape in DuckDB and PostgreSQL, so the audit runs on both engines.
    """
    table = model if isinstance(model, exp.Table) else model.find(exp.Table)
    if table is None or not table.name:
        raise ValueError(f"is_audited_table: cannot find the audited table in {model.sql()!r}")
    conditions = [
        exp.column("table_name").eq(exp.Literal.string(table.name)),
        exp.column("table_schema").eq(exp.Literal.string(table.db)),
    ]
    if table.catalog:
        conditions.append(exp.column("table_catalog").eq(exp.Literal.string(table.catalog)))
    return exp.and_(*conditions)


@macro()
def information_schema_columns(evaluator: MacroEvaluator) -> exp.Table:
    """``information_schema.columns`` of the warehouse the audit runs on.

    SQLMesh qualifies table names with the gateway's default catalog: right on PostgreSQL
    (``<database>.information_schema``), but DuckDB keeps information_schema in its ``system`` catalog, not in the
    attached warehouse file.
    """
    if evaluator.runtime_stage == "loading":
        return exp.to_table("information_schema.columns")
    if evaluator.engine_adapter.dialect == "duckdb":
        return exp.to_table("system.information_schema.columns")
    return exp.to_table("information_schema.columns")


@macro()
def within_processed_interval(evaluator: MacroEvaluator, day: exp.Expr, only_if_in_interval: exp.Expr) -> exp.Expr:
    """``day BETWEEN <first> AND <last day of the interval being processed>``, or TRUE.

    TRUE when ``only_if_in_interval`` is false, and for models that have no processed interval (FULL and VIEW models
    render their audits with the execution time only, so ``@start_date`` is undefined there).
    """
    start, end = evaluator.locals.get("start_date"), evaluator.locals.get("end_date")
    if not evaluator.eval_expression(only_if_in_interval) or start is None or end is None:
        return exp.true()
    return exp.Between(
        this=day,
        low=exp.cast(exp.Literal.string(str(start)), exp.DataType.Type.DATE),
        high=exp.cast(exp.Literal.string(str(end)), exp.DataType.Type.DATE),
    )
