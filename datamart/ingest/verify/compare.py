"""The comparison: source chunks merged with the warehouse stream, both in key order, into a :class:`TableCheck`
(missing, extra and changed keys, the key ranges that differ, the spans the repair reloads)."""

from __future__ import annotations

from collections.abc import Iterator

from datamart.ingest.verify.report import EXAMPLES, Key, RangeDrift, TableCheck
from datamart.ingest.verify.source_side import SourceRow
from datamart.ingest.verify.values import checksum, differing_columns, key_text


class _Peek:
    def __init__(self, it: Iterator[tuple[Key, bytes]]) -> None:
        self._it = it
        self._next: tuple[Key, bytes] | None = None
        self._done = False

    def peek(self) -> tuple[Key, bytes] | None:
        if self._next is None and not self._done:
            self._next = next(self._it, None)
            self._done = self._next is None
        return self._next

    def pop(self) -> tuple[Key, bytes]:
        item = self.peek()
        assert item is not None
        self._next = None
        return item


def compare_sorted(
    check: TableCheck,
    left: Iterator[list[SourceRow]],
    right: Iterator[tuple[Key, bytes]],
    chunk_size: int,
    deletions_expected: bool,
) -> None:
    """Merge source chunks with the warehouse stream (both in key order); fill ``check`` per key range.

    ``deletions_expected``: keys gone from the source must be gone from the warehouse (else they are only *kept*).
    """
    warehouse = _Peek(right)
    check.source_rows = check.warehouse_rows = 0
    for chunk in left:
        last_chunk = len(chunk) < chunk_size
        upper = max(row[0] for row in chunk) if chunk else None
        wh_rows: dict[Key, bytes] = {}
        twice: list[Key] = []
        while (item := warehouse.peek()) is not None and (last_chunk or item[0] <= upper):
            key, digest = warehouse.pop()
            if key in wh_rows:
                twice.append(key)  # a key loaded twice: a duplicate row in the warehouse
            wh_rows[key] = digest
        check.chunks += 1
        _compare_chunk(check, chunk, wh_rows, deletions_expected, twice)
        if last_chunk:
            break
    while warehouse.peek() is not None:  # defensive: the left side ended on a full chunk
        key, digest = warehouse.pop()
        _compare_chunk(check, [], {key: digest}, deletions_expected)


def _compare_chunk(
    check: TableCheck,
    chunk: list[SourceRow],
    wh_rows: dict[Key, bytes],
    deletions_expected: bool,
    twice: list[Key] | None = None,
) -> None:
    source = {key: (status, digest) for key, status, digest in chunk}
    for key, (status, digest) in list(source.items()):
        if status == "window":  # in the lag window: equal is compared as live, different is for the next run
            source[key] = ("live", digest) if wh_rows.get(key) == digest else ("pending", digest)
    missing: list[Key] = []
    changed: list[Key] = []
    kept: list[Key] = []
    extra: list[Key] = list(twice or [])
    for key, (status, digest) in source.items():
        if status == "pending":
            check.pending += 1
        elif status == "live":
            if key not in wh_rows:
                missing.append(key)
            elif wh_rows[key] != digest:
                changed.append(key)
    for key in wh_rows:
        status = source.get(key, ("absent", b""))[0]
        if status == "gone" or (status == "absent" and deletions_expected):
            extra.append(key)
        elif status == "absent":
            kept.append(key)
    live = [digest for status, digest in source.values() if status == "live"]
    compared_wh = [d for k, d in wh_rows.items() if source.get(k, ("absent",))[0] != "pending" and k not in kept]
    check.source_rows = (check.source_rows or 0) + len(live)
    check.warehouse_rows = (check.warehouse_rows or 0) + len(wh_rows) + len(twice or [])
    check.kept += len(kept)
    if not (missing or extra or changed):
        check._equal_since_span += len(source.keys() | wh_rows.keys())
        return
    _locate(check, source, wh_rows, {*missing, *extra, *changed}, deletions_expected)
    columns: dict[str, int] = {}
    for key in changed:
        for column in differing_columns(source[key][1], wh_rows[key], check.columns):
            columns[column] = columns.get(column, 0) + 1
    for column, count in columns.items():
        check.changed_columns[column] = check.changed_columns.get(column, 0) + count
    check.missing += len(missing)
    check.extra += len(extra)
    check.changed += len(changed)
    for examples, keys in (
        (check.missing_examples, missing),
        (check.extra_examples, extra),
        (check.changed_examples, changed),
    ):
        examples.extend(
            key_text(k) + (" (twice)" if twice and k in twice else "") for k in keys[: EXAMPLES - len(examples)]
        )
    every = sorted([*source, *wh_rows])
    check.ranges.append(
        RangeDrift(
            first=key_text(every[0]),
            last=key_text(every[-1]),
            source_rows=len(live),
            warehouse_rows=len(compared_wh) + len(twice or []),
            missing=len(missing),
            extra=len(extra),
            changed=len(changed),
            source_checksum=checksum(live),
            warehouse_checksum=checksum(compared_wh),
            columns=tuple(c for c in check.columns if c in columns),
        )
    )


def _locate(
    check: TableCheck,
    source: dict[Key, tuple[str, bytes]],
    wh_rows: dict[Key, bytes],
    differing: set[Key],
    deletions_expected: bool,
) -> None:
    """Record for the repair the runs of consecutive differing keys (``check.spans``) and the warehouse keys the
    source no longer has where deletions must follow (``check.gone``)."""
    for key in sorted(source.keys() | wh_rows.keys()):
        if key not in differing:
            check._equal_since_span += 1
            continue
        if check.spans and check._equal_since_span == 0:
            check.spans[-1][1] = key  # the run of differing keys goes on
        else:
            check.spans.append([key, key, check._equal_since_span])
        check._equal_since_span = 0
        if key not in source and deletions_expected:
            check.gone.append(key)
