"""Keep secrets out of what is printed, logged or stored: connection strings and known secret values are masked."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

MASK = "***"
# scheme://user:password@host → scheme://user:***@host (SQLAlchemy, libpq and fsspec URLs)
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s'\"]*:)(?P<secret>[^@\s'\"]+)(?P<tail>@)")
# password=…, secret: …, token='…' (libpq keyword strings, dict reprs, TOML)
_KEY_VALUE = re.compile(
    r"(?P<head>\b(?:password|passwd|pwd|secret|token|api_key|aws_secret_access_key|pii_hmac_key)"
    r"['\"]?\s*[:=]\s*['\"]?)(?P<secret>[^'\"\s,;}&]+)",
    re.IGNORECASE,
)
# Environment variables whose whole value is a secret, or a URL holding one.
_SECRET_NAMES = ("PASSWORD", "SECRET", "TOKEN", "API_KEY", "HMAC_KEY", "CREDENTIALS", "ACCESS_KEY", "WEBHOOK", "DSN")


def secret_values(extra: Iterable[str | None] = ()) -> set[str]:
    """Secret values known to this process: secret-named environment variables (and the passwords inside URLs)."""
    values = {v for v in extra if v}
    for name, value in os.environ.items():
        if not value or "DUCKDB" in name.upper() or not any(part in name.upper() for part in _SECRET_NAMES):
            continue  # a DuckDB "credential" is a file path: masking it would hide where the warehouse is
        match = _URL_PASSWORD.search(value)
        if match:
            values.add(match.group("secret"))
        elif "://" not in value:  # a URL without password (sqlite:///…, s3://bucket) is not itself a secret
            values.add(value)
    return {v for v in values if len(v) >= 4}  # never mask short fragments such as "1" or "db"


def redact(text: str, extra: Iterable[str | None] = ()) -> str:
    """``text`` with URL passwords, ``password=…``-style values and every known secret value replaced by ``***``."""
    text = _URL_PASSWORD.sub(lambda m: m.group("head") + MASK + m.group("tail"), text)
    text = _KEY_VALUE.sub(lambda m: m.group("head") + MASK, text)
    for value in sorted(secret_values(extra), key=len, reverse=True):
        text = text.replace(value, MASK)
    return text
