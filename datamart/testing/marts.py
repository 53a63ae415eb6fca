"""Compare what a published view serves with a from-scratch evaluation of its model over the raw tables."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from datamart.settings import Warehouse
from datamart.testing.views import CLOCK_COLUMNS


def from_scratch_query(context: Any, model: str, dialect: str) -> str:
    """``model``'s query with every upstream model expanded down to the raw tables (no physical table read).

    SQLMesh's own rendering (``Context.render(..., expand=True)``), in the warehouse's dialect.
    """
    upstream = [fqn for fqn in context.dag.upstream(context.get_model(model).fqn) if not _is_external(context, fqn)]
    # time-incremental models render for [start, end]: the whole history, up to now
    end = datetime.now(UTC) + timedelta(days=1)
    return context.render(model, start="1970-01-01", end=end, execution_time=end, expand=upstream).sql(dialect=dialect)


def differences_from_scratch(context: Any, warehouse: Warehouse, view: str) -> tuple[list[tuple], list[tuple]]:
    """(rows of a from-scratch build missing from ``view``, rows of ``view`` a from-scratch build lacks).

    Columns computed from the clock are left out. Both sides are fetched and compared as sorted Python tuples, so
    DuckDB and PostgreSQL compare alike; duplicates count.
    """
    columns = [name for name in warehouse.columns(*view.split(".")) if name not in CLOCK_COLUMNS]
    assert columns, f"{view} has no columns: does it exist?"
    selected = ", ".join(f'"{c}"' for c in columns)
    dialect = warehouse.dialect
    scratch = warehouse.query(f"SELECT {selected} FROM ({from_scratch_query(context, view, dialect)}) AS scratch")
    served = warehouse.query(f"SELECT {selected} FROM {view}")
    return _minus(scratch, served), _minus(served, scratch)


def _minus(left: list[tuple], right: list[tuple]) -> list[tuple]:
    remaining: dict[str, int] = {}
    for row in right:
        remaining[repr(row)] = remaining.get(repr(row), 0) + 1
    missing = []
    for row in left:
        key = repr(row)
        if remaining.get(key):
            remaining[key] -= 1
        else:
            missing.append(row)
    return sorted(missing, key=repr)


def _is_external(context: Any, fqn: str) -> bool:
    model = context.get_model(fqn)
    return model is None or model.kind.is_external
