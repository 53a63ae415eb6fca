"""Expected published figures under small-cell suppression, computed from source rows in plain Python."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

OTHER = "other"


def birth_decade(birth_date: Any) -> int | None:
    """The decade of a source birth date (a date or its ISO text), None when unknown or implausible like staging."""
    if birth_date is None:
        return None
    year = int(str(birth_date)[:4])
    return year - year % 10 if 1900 <= year <= 2030 else None


def expected_volunteer_activity(
    volunteers: Iterable[tuple[Any, str, Any]], application_volunteer_ids: Iterable[Any], threshold: int = 5
) -> dict[tuple[str, int | None], tuple[int, int, int]]:
    """``marts.volunteer_activity_v1`` as it must be: {(department, birth_decade): (volunteers, who applied,
    applications)}, groups under ``threshold`` volunteers merged into ("other", None), dropped if still too small.

    ``volunteers`` are source rows (id, department, birth_date); ``application_volunteer_ids`` one id per application.
    """
    applications = Counter(int(v) for v in application_volunteer_ids)
    cells: dict[tuple[str, int | None], list[int]] = {}
    for volunteer_id, department, born in volunteers:
        cell = cells.setdefault((str(department).strip().upper(), birth_decade(born)), [0, 0, 0])
        count = applications.get(int(volunteer_id), 0)
        cell[0] += 1
        cell[1] += 1 if count else 0
        cell[2] += count
    shown = {cell: tuple(v) for cell, v in cells.items() if v[0] >= threshold}
    small = [v for v in cells.values() if v[0] < threshold]
    other = tuple(sum(v[i] for v in small) for i in range(3))
    if other[0] >= threshold:
        shown[(OTHER, None)] = other
    return shown  # type: ignore[return-value]
