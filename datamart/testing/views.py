"""What a published view serves, as a comparable fingerprint (tests that check prod did not change)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

#: Columns computed from the clock when the view is read (marts.data_freshness_v1's ages): they change with time,
#: not with the data, so a fingerprint leaves them out (a test crossing a minute boundary would see a change).
CLOCK_COLUMNS = frozenset({"minutes_since_last_success", "hours_since_last_success"})


def view_checksum(query: Callable[[str], list[tuple[Any, ...]]], view: str) -> tuple[int, str]:
    """Row count and a portable checksum of ``view`` (``schema.name``): its rows, without clock columns, fetched,
    rendered, sorted and hashed in Python, so DuckDB and PostgreSQL compare alike."""
    schema, name = view.split(".")
    columns = [
        row[0]
        for row in query(
            "SELECT column_name FROM information_schema.columns "
            f"WHERE table_schema = '{schema}' AND table_name = '{name}' ORDER BY ordinal_position"
        )
    ]
    assert columns, f"{view} has no columns: does it exist?"
    selected = ", ".join('"' + c.replace('"', '""') + '"' for c in columns if c not in CLOCK_COLUMNS)
    rows = sorted(repr(tuple(row)) for row in query(f"SELECT {selected} FROM {view}"))
    return len(rows), hashlib.sha256("\n".join(rows).encode()).hexdigest()
