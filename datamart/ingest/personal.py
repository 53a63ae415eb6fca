"""Personal-data treatments applied in the extract step, before anything is written to a load package.

- ``hash``: keyed HMAC-SHA256 (hex) with the secret ``datamart.pii_hmac_key``; the same value gives the same
  pseudonym in every table and run, so joins still work, and nobody without the key can recompute it.
- ``drop``: the column is never selected from the source (``sources._sql_resource``), and removed if present.
- ``year``: a date becomes its year, ``<name minus _date>_year`` (``birth_date`` → ``birth_year``); SQL sources
  compute it in the SELECT, so the date never leaves the source.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from datamart.settings import SettingsError, secret

HMAC_KEY_SECRET = "datamart.pii_hmac_key"

#: The treatments a declaration may give a personal column (``personal: {column: treatment}``): every reader (the
#: extract, the declarations, verify, the external models, the lineage check, erasure, the register) compares with
#: these names, never with a literal of its own.
HASH, DROP, YEAR, KEEP = "hash", "drop", "year", "keep"
TREATMENTS = (HASH, DROP, YEAR, KEEP)


def require_hmac_key(pipeline: str) -> bytes:
    """The HMAC key, or a stop before extraction naming the secret to set."""
    key = secret(HMAC_KEY_SECRET)
    if not key or str(key).startswith("replace-with"):
        raise SettingsError(
            f"pipeline '{pipeline}' declares personal columns to hash but the secret {HMAC_KEY_SECRET} is not set: "
            "nothing was extracted. Add [datamart] pii_hmac_key to .dlt/secrets.toml or set "
            'DATAMART__PII_HMAC_KEY (generate one with: python -c "import secrets; print(secrets.token_hex(32))").'
        )
    return str(key).encode()


def pseudonym(key: bytes, value: Any) -> str | None:
    """The keyed HMAC-SHA256 pseudonym of ``value`` (None stays None)."""
    if value is None:
        return None
    return hmac.new(key, str(value).encode(), hashlib.sha256).hexdigest()


def year_column(name: str) -> str:
    """The column that receives the year of date column ``name``."""
    return (name[: -len("_date")] if name.endswith("_date") else name) + "_year"


def loaded_column(column: str, treatment: str) -> str | None:
    """The warehouse column that source column ``column`` becomes under ``treatment``; None when it is never loaded."""
    return {HASH: column, YEAR: year_column(column), KEEP: column}.get(treatment)


def personal_data_map(pipeline: str, table: str, policy: dict[str, str]) -> Callable[[Any], Any]:
    """A dlt ``add_map`` function applying ``policy`` to arrow tables or dict rows."""
    key = require_hmac_key(pipeline) if HASH in policy.values() else b""

    def apply(item: Any) -> Any:
        if isinstance(item, pa.Table | pa.RecordBatch):
            return _apply_arrow(pa.Table.from_batches([item]) if isinstance(item, pa.RecordBatch) else item)
        return _apply_row(item)

    def _apply_arrow(tbl: pa.Table) -> pa.Table:
        for column, treatment in policy.items():
            if column not in tbl.column_names:
                continue
            index = tbl.column_names.index(column)
            if treatment == DROP:
                tbl = tbl.remove_column(index)
            elif treatment == HASH:
                values = [pseudonym(key, v) for v in tbl.column(index).to_pylist()]
                tbl = tbl.set_column(index, column, pa.array(values, type=pa.string()))
            elif treatment == YEAR:
                years = pc.year(tbl.column(index)).cast(pa.int64())
                tbl = tbl.set_column(index, year_column(column), years)
        return tbl

    def _apply_row(row: dict[str, Any]) -> dict[str, Any]:
        for column, treatment in policy.items():
            if column not in row:
                continue
            value = row.pop(column)
            if treatment == HASH:
                row[column] = pseudonym(key, value)
            elif treatment == YEAR:
                row[year_column(column)] = None if value is None else int(str(value)[:4])
            elif treatment == KEEP:  # classified as not personal: loaded as it is (a replication change's row)
                row[column] = value
        return row

    apply.__name__ = f"personal_data_{table}"
    return apply
