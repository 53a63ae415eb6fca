"""What a verification found: per table (:class:`TableCheck`, with its drifting key ranges), per pipeline
(:class:`VerifyReport`, printed by ``dlt pipeline <name> verify``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_CHUNK = 50_000


EXAMPLES = 5


INTERNAL_PREFIXES = ("_dlt_", "_datamart_")


Key = tuple[Any, ...]


@dataclass
class RangeDrift:
    """One key range whose rows differ between the source and the warehouse."""

    first: str
    last: str
    source_rows: int
    warehouse_rows: int
    missing: int
    extra: int
    changed: int
    source_checksum: str
    warehouse_checksum: str
    columns: tuple[str, ...] = ()  # the compared columns whose values differ in the changed rows (names only)


@dataclass
class TableCheck:
    """The comparison of one table."""

    table: str
    method: str  # "keys+checksums", "counts", "skipped", "not loaded"
    source_rows: int | None = None
    warehouse_rows: int | None = None
    pending: int = 0
    missing: int = 0
    extra: int = 0
    changed: int = 0
    kept: int = 0
    chunks: int = 0
    missing_examples: list[str] = field(default_factory=list)
    extra_examples: list[str] = field(default_factory=list)
    changed_examples: list[str] = field(default_factory=list)
    ranges: list[RangeDrift] = field(default_factory=list)
    columns: tuple[str, ...] = ()
    # changed rows per differing column (names only: the values, personal or not, are never reported)
    changed_columns: dict[str, int] = field(default_factory=dict)
    # source columns the warehouse table lacks (never loaded), and those a run holds back on purpose (an
    # unclassified column of a table with personal data: classified under personal:, not repaired)
    missing_columns: tuple[str, ...] = ()
    held_back_columns: tuple[str, ...] = ()
    note: str = ""
    fix: str = ""
    # why runs do not load the table (a source column gone, or its last run failed without loading it), and what
    # to do: drift whatever the rows compare, and rows past dlt's cursor are compared instead of counted as pending
    stopped: str = ""
    stopped_hint: str = ""
    # columns whose source type (as dlt maps it) differs from the type loaded: (column, loaded, source)
    retyped: list[tuple[str, str, str]] = field(default_factory=list)
    # for ``verify --repair`` (datamart/ingest/repair.py), not printed: the runs of consecutive differing keys as
    # [first, last, equal keys since the previous run], and the warehouse keys to delete (gone from the source
    # where deletions must follow)
    spans: list[list[Any]] = field(default_factory=list)
    gone: list[Key] = field(default_factory=list)
    _equal_since_span: int = 0

    @property
    def drift(self) -> bool:
        """True when the warehouse does not hold what the source holds."""
        if self.method == "skipped":
            return False
        if self.stopped or self.retyped:
            return True
        if self.method == "not loaded":
            return bool(self.source_rows)
        if self.method == "counts":
            return self.source_rows != self.warehouse_rows or bool(self.missing_columns)
        return bool(self.missing or self.extra or self.changed or self.missing_columns)


@dataclass
class VerifyReport:
    """What :func:`verify_pipeline` found, per table; ``drift`` is True when any table differs."""

    pipeline: str
    dataset: str
    warehouse: str
    tables: list[TableCheck] = field(default_factory=list)
    elapsed: float = 0.0
    title: str = "verify"

    @property
    def drift(self) -> bool:
        """True when any table drifted."""
        return any(t.drift for t in self.tables)

    def format(self) -> str:
        """A table per pipeline, then each drift located (key ranges, example keys) with the command that fixes it."""
        lines = [f"{self.title} {self.pipeline} → {self.warehouse}, dataset {self.dataset}"]
        head = (
            f"{'table':<24}{'compared':<16}{'source':>10}{'warehouse':>11}{'pending':>9}{'missing':>9}{'extra':>8}"
            f"{'changed':>9}{'kept':>7}  result"
        )
        lines.append(head)

        def n(value: int | None) -> str:
            return "-" if value is None else f"{value:,}"

        for t in self.tables:
            result = "DRIFT" if t.drift else ("skipped" if t.method == "skipped" else "ok")
            lines.append(
                f"{t.table:<24}{t.method:<16}{n(t.source_rows):>10}{n(t.warehouse_rows):>11}{t.pending:>9,}"
                f"{t.missing:>9,}{t.extra:>8,}{t.changed:>9,}{t.kept:>7,}  {result}"
            )
        for t in self.tables:
            if t.note and (t.drift or t.method in ("skipped", "counts")):
                lines.append(f"  {t.table}: {t.note}")
            if t.held_back_columns:
                lines.append(
                    f"  {t.table}: source column(s) {', '.join(t.held_back_columns)} held back (the table holds "
                    f"personal data): classify them under personal: in {self.pipeline}.yaml, a run then loads them"
                )
            if not t.drift:
                continue
            where = f"{self.dataset}.{t.table}"
            if t.stopped:
                lines.append(
                    f"  {where}: NOT LOADED BY RUNS, {t.stopped} (its rows past dlt's cursor are compared, not "
                    f"pending); what to do: {t.stopped_hint}"
                )
            for column, loaded, now in t.retyped:
                lines.append(
                    f"  {where}: column {column} was loaded as {loaded}, the source's type is now {now} (`dlt pipeline "
                    f"{self.pipeline} run` migrates it and reloads the table)"
                )
            if t.missing_examples:
                lines.append(
                    f"  {where}: {t.missing:,} key(s) missing from the warehouse, e.g. {_ex(t.missing_examples)}"
                )
            if t.extra_examples:
                lines.append(
                    f"  {where}: {t.extra:,} key(s) in the warehouse, not in the source, e.g. {_ex(t.extra_examples)}"
                )
            if t.missing_columns:
                lines.append(
                    f"  {where}: source column(s) not in the warehouse: {', '.join(t.missing_columns)} (never loaded: "
                    f"`dlt pipeline {self.pipeline} verify --repair --table {t.table}` reloads the table with them)"
                )
            if t.changed_examples:
                lines.append(f"  {where}: {t.changed:,} row(s) with different values, e.g. {_ex(t.changed_examples)}")
            if t.changed_columns:
                counts = ", ".join(f"{c} ({n:,} rows)" for c, n in t.changed_columns.items())
                lines.append(f"  {where}: columns that differ: {counts}")
            for r in t.ranges[:EXAMPLES]:
                differ = f"; columns {', '.join(r.columns)}" if r.columns else ""
                lines.append(
                    f"  {where}: key range {r.first} … {r.last}: source {r.source_rows:,} rows, warehouse "
                    f"{r.warehouse_rows:,}; missing {r.missing:,}, extra {r.extra:,}, changed {r.changed:,}{differ}; "
                    f"checksum {r.source_checksum} ≠ {r.warehouse_checksum}"
                )
            if len(t.ranges) > EXAMPLES:
                lines.append(f"  {where}: … and {len(t.ranges) - EXAMPLES} more key range(s)")
            if t.fix:
                lines.append(f"  DRIFT in pipeline {self.pipeline}, table {t.table}: fix with `{t.fix}`")
        drifted = [t.table for t in self.tables if t.drift]
        verdict = f"DRIFT in {', '.join(drifted)}" if drifted else "no drift"
        lines.append(f"{self.pipeline}: {verdict} ({self.elapsed:.1f}s)")
        return "\n".join(lines)


def _ex(examples: list[str]) -> str:
    return ", ".join(examples)
