"""Shared errors of the datamart, at the ground floor: what every floor asks of an exception.

The error of a wrong declaration (:class:`DeclarationError`, with :func:`closest` for its "did you mean"), whether a
failure is worth a retry (:func:`is_transient`), whether a server refused the credentials
(:func:`refused_credentials`), what is in an exception's cause chain (:func:`in_chain`) and its one-line root cause
(:func:`root_cause`). The ingestion, the scheduled run, the promotion and the command line all ask; none of these
helpers imports anything of ``datamart``, so any module may import them without a loop.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any


class DeclarationError(ValueError):
    """A declaration is wrong; the message names the file, the key and the fix."""


def declaration_error(path: Path, key: str, message: str) -> DeclarationError:
    """The error of declaration file ``path`` at ``key`` (``tables.missions.cursor``): ``<file>: <key>: <message>``."""
    return DeclarationError(f"{path.name}: {key}: {message}")


def closest(name: str, valid: Any) -> str:
    """`` (did you mean 'x'?)`` when ``name`` looks like a typo of one of ``valid``, else empty."""
    match = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


#: PEP 249 errors a database reports about the data or the statement, whatever the driver (psycopg2, ADBC,
#: SQLAlchemy): rerunning does not fix them.
_REFUSED = frozenset({"IntegrityError", "DataError", "ProgrammingError"})


def is_transient(exc: BaseException) -> bool:
    """True for lost connections and timeouts anywhere in the exception chain; never for data or declaration errors.

    dlt files every failed ADBC load job as transient (the driver's errors are not psycopg2's): a row the warehouse
    refuses (a constraint, a value out of range) would be retried and reported as a connection problem, so a
    refusal anywhere in the chain wins."""
    import psycopg2
    import sqlalchemy.exc
    from dlt.common.destination.exceptions import DestinationTransientException

    transient = (
        ConnectionError,
        TimeoutError,
        psycopg2.OperationalError,
        sqlalchemy.exc.OperationalError,
        DestinationTransientException,
    )
    if _refused(exc) or refused_credentials(exc) is not None or _local_file_error(exc):
        return False
    return in_chain(exc, transient) is not None


#: SQLSTATE classes of a server that may answer differently later: connection exception, transaction rollback
#: (deadlock, serialization), insufficient resources, operator intervention (shutdown, cancel), system error; and
#: a lock timeout. Any other SQLSTATE is the server's answer about the statement or the data: rerunning gives it again.
_TRANSIENT_SQLSTATES = ("08", "40", "53", "57", "58", "55P03")


#: What a server answers to a connection whose settings are wrong: rerunning does not fix them.
_CREDENTIALS_REFUSED = re.compile(
    r"password authentication failed|no password supplied|no pg_hba\.conf entry|"
    r"(role|database) \"[^\"]*\" does not exist|authentication failed",
    re.IGNORECASE,
)


def refused_credentials(exc: BaseException) -> tuple[str, str] | None:
    """``(side, reason)`` when a server refused the connection's credentials (a wrong password or user, a database
    that does not exist): ``side`` is ``source`` (read through SQLAlchemy or connectorx, during extract) or
    ``warehouse``; None for anything else."""
    from dlt.pipeline.exceptions import PipelineStepFailed

    refused = _first_in_chain(exc, lambda e: bool(_CREDENTIALS_REFUSED.search(str(e))))
    if refused is None:
        return None
    text = " ".join(str(refused).split())
    match = _CREDENTIALS_REFUSED.search(text)
    assert match is not None
    reason = text[match.start() :].split(" [SQL", 1)[0].split("(Background on this error", 1)[0].strip()
    step = in_chain(exc, PipelineStepFailed)
    from_source = _first_in_chain(exc, lambda e: type(e).__module__.startswith(("sqlalchemy", "connectorx")))
    side = "source" if from_source is not None or getattr(step, "step", None) == "extract" else "warehouse"
    return side, reason


def _local_file_error(exc: BaseException) -> bool:
    """A SQLite source that cannot be opened (a missing folder, a locked or corrupt file): a local file does not come
    back by waiting."""
    import sqlite3

    return in_chain(exc, sqlite3.Error) is not None


def _refused(exc: BaseException) -> bool:
    """A refusal anywhere in the chain: a PEP 249 data/statement error by its class name, or a server error whose
    SQLSTATE is not a transient one — e.g. ``DependentObjectsStillExist`` (2BP01), which psycopg2 files under
    InternalError and dlt therefore as transient."""

    def refused(e: BaseException) -> bool:
        if any(k.__name__ in _REFUSED for k in type(e).__mro__):
            return True
        for candidate in (e, getattr(e, "dbapi_exception", None)):
            code = getattr(candidate, "pgcode", None) or getattr(candidate, "sqlstate", None)
            if isinstance(code, str) and len(code) == 5 and code != "00000":
                return not code.startswith(_TRANSIENT_SQLSTATES)
        return False

    return _first_in_chain(exc, refused) is not None


def in_chain(exc: BaseException, kind: type[BaseException] | tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of type ``kind`` in ``exc``'s cause/context chain, or None."""
    return _first_in_chain(exc, lambda e: isinstance(e, kind))


def _first_in_chain(exc: BaseException, test: Callable[[BaseException], bool]) -> BaseException | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if test(current):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def root_cause(exc: BaseException) -> str:
    """``Type: first line`` of the innermost cause."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
