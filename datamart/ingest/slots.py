"""The replication slot seen from outside a run: what it keeps on the source, and how to remove it.

A logical slot keeps every WAL segment the server wrote since its last confirmed position, for the whole server, until
the slot is advanced: a replication pipeline that stops running (or is removed) without its slot fills the source's
disk. So each replication run measures its slot (:func:`measure`: the retained WAL, ``pg_wal_lsn_diff(
pg_current_wal_lsn(), restart_lsn)``, and the WAL not yet confirmed, from ``confirmed_flush_lsn``), records it in
``ops.replication_slots`` (:func:`datamart.ingest.ops.record_slot`) and prints it in the summary; the published view
``marts.data_freshness_v1`` shows the latest measurement per pipeline, and the scheduled run's ``replication_slots``
step fails (and alerts) when a slot retains more than the declared ``source.max_retained_wal`` (default
:data:`DEFAULT_MAX_RETAINED_WAL`). ``dlt pipeline <name> drop-replication`` removes the slot and the publication
(:func:`drop_slot`, :func:`drop_publication`).

Sizes are written as PostgreSQL writes them (``max_slot_wal_keep_size``): a number and kB, MB, GB or TB, in units of
1024 (``1GB`` is 1024³ bytes), or a bare number of bytes.

This module only talks to a connection it is given: the source connection and its checks are
``datamart.ingest.replication``'s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datamart.ingest.declarations import PipelineDecl

#: The declaration key of the threshold, under ``source:``.
MAX_RETAINED_WAL_KEY = "max_retained_wal"
#: Above this, the scheduled run alerts: a day of a busy application's WAL, far below a source disk's free space.
DEFAULT_MAX_RETAINED_WAL = "1GB"
_UNITS = {"": 1, "B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def parse_size(value: Any) -> int:
    """Bytes of a size written ``1GB``, ``512MB``, ``64kB`` (PostgreSQL's units, 1024-based) or a number of bytes;
    ValueError with the accepted forms otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, int) and value > 0:
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?[bB]?)\s*", str(value))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"{value!r} is not a size: write a positive number and kB, MB, GB or TB, e.g. 1GB")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def format_size(size: int | None) -> str:
    """``1.5 GB``, ``24.0 kB``, ``0 B``: as ``pg_size_pretty`` would round it, for summaries and messages."""
    if size is None:
        return "unknown"
    for unit, factor in (("TB", 1024**4), ("GB", 1024**3), ("MB", 1024**2), ("kB", 1024)):
        if abs(size) >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{size} B"


def max_retained_wal(decl: PipelineDecl) -> int:
    """The pipeline's threshold in bytes (``source.max_retained_wal``, checked when the declaration is read)."""
    return parse_size(decl.options.get(MAX_RETAINED_WAL_KEY) or DEFAULT_MAX_RETAINED_WAL)


@dataclass(frozen=True)
class SlotStatus:
    """One measurement of a slot on the source."""

    slot: str
    retained_wal_bytes: int  # pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn): WAL the source must keep for it
    lag_bytes: int  # pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn): written since the last confirmation
    restart_lsn: str
    confirmed_flush_lsn: str
    current_lsn: str
    max_retained_wal_bytes: int
    measured_at: datetime

    @property
    def over(self) -> bool:
        """Whether the slot keeps more WAL than the pipeline's ``max_retained_wal``."""
        return self.retained_wal_bytes > self.max_retained_wal_bytes

    def describe(self) -> str:
        """One line for the run summary (and the alert when it is over the threshold)."""
        text = (
            f"slot {self.slot!r} retains {format_size(self.retained_wal_bytes)} of WAL on the source "
            f"({format_size(self.lag_bytes)} written since its last confirmed position; max_retained_wal "
            f"{format_size(self.max_retained_wal_bytes)})"
        )
        if self.over:
            text = "WARNING: " + text.replace(" of WAL", " of WAL, ABOVE max_retained_wal,", 1)
        return text


def measure(conn: Any, slot: str, threshold: int) -> SlotStatus | None:
    """The slot's retained WAL and lag, measured now on ``conn`` (the source); None when there is no such slot."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT pg_wal_lsn_diff(current, restart_lsn)::bigint, pg_wal_lsn_diff(current, confirmed_flush_lsn)"
            "::bigint, restart_lsn::text, confirmed_flush_lsn::text, current::text, now() "
            "FROM pg_replication_slots, (SELECT pg_current_wal_lsn() AS current) AS wal WHERE slot_name = %s",
            (slot,),
        )
        row = cur.fetchone()
    if row is None:
        return None
    retained, lag, restart, confirmed, current, now = row
    return SlotStatus(
        slot=slot,
        retained_wal_bytes=int(retained or 0),
        lag_bytes=int(lag or 0),
        restart_lsn=restart or "",
        confirmed_flush_lsn=confirmed or "",
        current_lsn=current,
        max_retained_wal_bytes=threshold,
        measured_at=now.astimezone(UTC),
    )


def wal_status(conn: Any, slot: str) -> str | None:
    """The slot's ``wal_status`` (``reserved``, ``extended``, ``unreserved``, or ``lost`` once the source invalidated
    it for keeping more WAL than ``max_slot_wal_keep_size``); None when there is no such slot."""
    with conn.cursor() as cur:
        cur.execute("SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", (slot,))
        row = cur.fetchone()
    return None if row is None else str(row[0])


def over_threshold_hint(pipeline: str, status: SlotStatus) -> str:
    """What to do when a slot retains more than its threshold."""
    return (
        f"run `dlt pipeline {pipeline} run` (it reads the slot and lets the source recycle that WAL) and find why it "
        f"did not run or failed; if the pipeline is retired, `dlt pipeline {pipeline} drop-replication` removes the "
        f"slot; or raise source.max_retained_wal in pipelines/{pipeline}.yaml if the source's disk allows it"
    )


def drop_slot(conn: Any, slot: str) -> str:
    """Drop the logical slot ``slot`` of this database: ``dropped`` or ``absent``. Raises psycopg2's
    InsufficientPrivilege (the caller prints the DBA's SQL), or RuntimeError when the slot is in use or belongs to
    another database or plugin (not ours to drop)."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT plugin, database, active_pid FROM pg_replication_slots WHERE slot_name = %s AND slot_type = "
            "'logical'",
            (slot,),
        )
        row = cur.fetchone()
        if row is None:
            return "absent"
        plugin, database, active_pid = row
        here = conn.get_dsn_parameters().get("dbname")
        if plugin != "pgoutput" or database != here:
            raise RuntimeError(
                f"slot {slot!r} is not this pipeline's (plugin {plugin}, database {database}, not pgoutput on {here}): "
                "left in place; check the declared source.slot"
            )
        if active_pid is not None:
            raise RuntimeError(
                f"slot {slot!r} is in use by the server process {active_pid} (a replication connection reading it): "
                f"stop that reader, or a DBA ends it with SELECT pg_terminate_backend({active_pid}); then run again"
            )
        cur.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    return "dropped"


def drop_publication(conn: Any, publication: str) -> str:
    """Drop the publication ``publication``: ``dropped`` or ``absent``. Raises InsufficientPrivilege (not its owner)."""
    from datamart.settings import quote_identifier

    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,))
        if cur.fetchone() is None:
            return "absent"
        cur.execute(f"DROP PUBLICATION IF EXISTS {quote_identifier(publication)}")
    return "dropped"
