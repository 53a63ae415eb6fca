"""One run of a pipeline at a time, whatever the machine: a lock held in (or beside) the warehouse.

- PostgreSQL: a session-level advisory lock (``pg_try_advisory_lock``) taken on a dedicated connection kept open for
  the whole run. The lock belongs to the server, so it works across machines; the server releases it when that
  connection ends, including when the process is killed (SIGKILL) or its machine disappears (once TCP notices).
- DuckDB: an OS lock (``fcntl.flock``) on a file beside the DuckDB file, ``<warehouse>.duckdb.<pipeline>.lock``.
  A DuckDB file is only ever written by processes of one machine (DuckDB itself allows one writing process), so a
  machine-local lock is enough; the kernel releases it when the process dies. The file holds the holder's host, pid
  and start time for the refusal message, and is never deleted (deleting a lock file races with its next holder).

A second run waits up to ``wait`` seconds (0: refuses at once) and then raises :class:`PipelineLocked` naming who
holds the lock (host, pid, start time, from ``ops.pipeline_runs`` or the lock file).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from datamart.ingest.ops import running_holder
from datamart.settings import Warehouse

POLL_SECONDS = 0.5
LOCK_NAMESPACE = 1684632942  # first int4 of the two-key advisory lock: "datamart" pipelines (arbitrary, stable)


class PipelineLocked(RuntimeError):
    """Another run of the same pipeline holds the lock; the message names it and what to do."""


@dataclass
class Holder:
    """Who holds a pipeline's lock, as far as it is known."""

    host: str | None = None
    pid: int | None = None
    started_at: Any = None

    def describe(self) -> str:
        """``host X, pid N, started T`` with what is known."""
        parts = []
        if self.host:
            parts.append(f"host {self.host}")
        if self.pid:
            parts.append(f"pid {self.pid}")
        if self.started_at:
            started = self.started_at
            if isinstance(started, datetime):
                started = started.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
            parts.append(f"started {started}")
        return ", ".join(parts) or "holder unknown"


def lock_file(warehouse: Warehouse, pipeline: str) -> Path:
    """The DuckDB lock file of ``pipeline``, beside the warehouse file."""
    assert warehouse.duckdb_path is not None
    return warehouse.duckdb_path.with_name(f"{warehouse.duckdb_path.name}.{pipeline}.lock")


def _refusal(pipeline: str, holder: Holder, wait: float) -> PipelineLocked:
    waited = f" after waiting {wait:g}s" if wait else ""
    return PipelineLocked(
        f"pipeline '{pipeline}' is already running ({holder.describe()}): this run did not start{waited}. "
        f"Let that run finish (its progress is in ops.pipeline_runs), or wait for it: "
        f"dlt pipeline {pipeline} run --wait 600"
    )


@contextmanager
def pipeline_lock(warehouse: Warehouse, pipeline: str, wait: float = 0.0) -> Iterator[Holder]:
    """Hold the lock of ``pipeline`` for the block; wait up to ``wait`` seconds, then raise :class:`PipelineLocked`."""
    me = Holder(host=socket.gethostname(), pid=os.getpid(), started_at=datetime.now(UTC))
    if warehouse.is_server:
        with _pg_lock(warehouse, pipeline, wait, me):
            yield me
    else:
        with _file_lock(warehouse, pipeline, wait, me):
            yield me


def _deadline_loop(wait: float) -> Iterator[bool]:
    """Yields True for each attempt while time remains; the last attempt is at or after the deadline."""
    deadline = time.monotonic() + max(wait, 0.0)
    while True:
        yield True
        if time.monotonic() >= deadline:
            return
        time.sleep(min(POLL_SECONDS, max(deadline - time.monotonic(), 0.01)))


@contextmanager
def _file_lock(warehouse: Warehouse, pipeline: str, wait: float, me: Holder) -> Iterator[None]:
    path = lock_file(warehouse, pipeline)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for _ in _deadline_loop(wait):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                continue
        else:
            raise _refusal(pipeline, _file_holder(path), wait)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": me.host, "pid": me.pid, "started_at": me.started_at.isoformat()}).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _file_holder(path: Path) -> Holder:
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return Holder()
    started = data.get("started_at")
    return Holder(
        host=data.get("host"), pid=data.get("pid"), started_at=datetime.fromisoformat(started) if started else None
    )


def _lock_key(pipeline: str) -> tuple[str, tuple[Any, ...]]:
    return "%s, hashtext(%s)", (LOCK_NAMESPACE, f"datamart.pipeline.{pipeline}")


@contextmanager
def _pg_lock(warehouse: Warehouse, pipeline: str, wait: float, me: Holder) -> Iterator[None]:
    conn = warehouse.connect(
        application_name=f"datamart lock {pipeline}"[:63],
        # a dead peer (machine gone) is noticed in about a minute, and its lock released by the server
        keepalives=1,
        keepalives_idle=30,
        keepalives_interval=10,
        keepalives_count=3,
    )
    conn.autocommit = True  # a session lock, no transaction left open for the whole run
    args, params = _lock_key(pipeline)
    try:
        with conn.cursor() as cur:
            for _ in _deadline_loop(wait):
                cur.execute(f"SELECT pg_try_advisory_lock({args})", params)
                if cur.fetchone()[0]:
                    break
            else:
                raise _refusal(pipeline, _pg_holder(warehouse, cur, pipeline), wait)
        try:
            yield
        finally:
            with conn.cursor() as cur:
                cur.execute(f"SELECT pg_advisory_unlock({args})", params)
    finally:
        conn.close()


def _pg_holder(warehouse: Warehouse, cur: Any, pipeline: str) -> Holder:
    """The holder from ops.pipeline_runs (host, pid, start), else from the server's view of the locking session."""
    recorded = running_holder(warehouse, pipeline)
    if recorded:
        return Holder(**recorded)
    _, params = _lock_key(pipeline)
    cur.execute(
        "SELECT host(a.client_addr), a.backend_start FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s AND l.objid = hashtext(%s)::oid",
        params,
    )
    row = cur.fetchone()
    return Holder(host=row[0] or "local socket", started_at=row[1]) if row else Holder()
