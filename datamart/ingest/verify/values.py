"""Values compared alike on both sides: a column's comparison kind, the value coerced to it, row digests that
keep no value but tell which columns differ, and order-independent checksums."""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Iterable
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from datamart.ingest.verify.report import Key


def value_kind(sql_type: str) -> str:
    """The comparison kind of a warehouse column type (DuckDB or PostgreSQL spelling)."""
    t = sql_type.lower()
    if "timestamp" in t:
        return "timestamp"
    if t == "date":
        return "date"
    if t.startswith("time"):
        return "time"
    if "int" in t and "interval" not in t:
        return "int"
    if any(word in t for word in ("double", "real", "float")):
        return "float"
    if "decimal" in t or "numeric" in t:
        return "decimal"
    if "bool" in t:
        return "bool"
    if "json" in t:
        return "json"
    if "blob" in t or "bytea" in t:
        return "bytes"
    return "text"


def coerce(value: Any, kind: str) -> Any:
    """``value`` as the Python value of a warehouse column of ``kind`` (timestamps naive UTC); None stays None."""
    if value is None:
        return None
    if hasattr(value, "to_pydatetime"):  # pandas Timestamp
        value = value.to_pydatetime()
    elif hasattr(value, "item") and not isinstance(value, str | bytes):  # numpy scalars
        value = value.item()
    try:
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "decimal":
            return Decimal(str(value)).normalize()
        if kind == "bool":
            return value.strip().lower() in ("true", "t", "1", "yes") if isinstance(value, str) else bool(value)
        if kind == "timestamp":
            if isinstance(value, str):
                value = datetime.fromisoformat(value.replace("Z", "+00:00"))
            elif isinstance(value, date) and not isinstance(value, datetime):
                value = datetime(value.year, value.month, value.day)
            if value.tzinfo is not None:
                value = value.astimezone(UTC).replace(tzinfo=None)
            return value
        if kind == "date":
            if isinstance(value, datetime):
                return value.date()
            return date.fromisoformat(value[:10]) if isinstance(value, str) else value
        if kind == "json":
            return json.dumps(json.loads(value) if isinstance(value, str) else value, sort_keys=True, default=str)
        if kind == "bytes":
            return bytes(value)
        return value if isinstance(value, str) else str(value)
    except (TypeError, ValueError, ArithmeticError):
        return ("uncomparable", str(value))  # differs from any well-typed value: reported as a changed row


def canonical(value: Any) -> str:
    if value is None:
        return "\x00"
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return repr(value)


def row_digest(values: Iterable[Any]) -> bytes:
    """The digest of a row of already coerced values: 8 bytes of the whole row, then 4 per column (CRC-32), so
    that a changed row tells which columns differ (:func:`differing_columns`) without keeping any value."""
    parts = [canonical(v).encode() for v in values]
    whole = hashlib.blake2b(b"\x1e".join(parts), digest_size=8).digest()
    return whole + b"".join(zlib.crc32(p).to_bytes(4, "big") for p in parts)


def differing_columns(left: bytes, right: bytes, columns: Iterable[str]) -> list[str]:
    """The columns whose per-column digests differ between two row digests of :func:`row_digest`."""
    return [c for i, c in enumerate(columns) if left[8 + 4 * i : 12 + 4 * i] != right[8 + 4 * i : 12 + 4 * i]]


def checksum(digests: Iterable[bytes]) -> str:
    """An order-independent checksum of row digests (8 hex characters)."""
    return hashlib.blake2b(b"".join(sorted(d[:8] for d in digests)), digest_size=4).hexdigest()


def key_text(key: Key) -> str:
    parts = [canonical(k) if not isinstance(k, str) else k for k in key]
    return parts[0] if len(parts) == 1 else "(" + ", ".join(parts) + ")"
