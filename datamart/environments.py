"""dev, preprod and prod: each warehouse knows which environment it belongs to, and refuses the others.

``DATAMART_ENV`` (see :func:`datamart.settings.selected_environment`) selects the environment, hence the warehouse
credentials. The first command that uses a warehouse writes the environment into ``ops.warehouse_environment``; every
later command compares, so prod credentials used with ``DATAMART_ENV=dev`` (or dev credentials with
``DATAMART_ENV=prod``) stop before anything is read or written.
"""

from __future__ import annotations

import getpass
import socket

from datamart.settings import SettingsError, Warehouse

OPS_SCHEMA = "ops"  # operations tables (the environment marker; run records are added beside it)
MARKER_TABLE = "warehouse_environment"


class EnvironmentMismatch(SettingsError):
    """The warehouse belongs to another environment than ``DATAMART_ENV``."""


def _marked_by() -> str:
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except Exception:  # noqa: BLE001 - no user name in some containers: the host is enough
        return socket.gethostname()


def warehouse_environment(warehouse: Warehouse) -> str | None:
    """The environment recorded in the warehouse, or None when it was never marked."""
    if not warehouse.table_exists(OPS_SCHEMA, MARKER_TABLE):
        return None
    rows = warehouse.query(f"SELECT environment FROM {OPS_SCHEMA}.{MARKER_TABLE} ORDER BY marked_at LIMIT 1")
    return str(rows[0][0]) if rows else None


def check_environment(warehouse: Warehouse) -> str:
    """Mark an unmarked warehouse with ``warehouse.environment``; refuse one marked with another. Returns the mark."""
    create = (
        f"CREATE TABLE IF NOT EXISTS {OPS_SCHEMA}.{MARKER_TABLE} ("
        "environment VARCHAR NOT NULL, marked_at TIMESTAMP NOT NULL, marked_by VARCHAR)"
    )
    insert = f"INSERT INTO {OPS_SCHEMA}.{MARKER_TABLE} (environment, marked_at, marked_by) VALUES "
    if warehouse.duckdb_path is not None:  # the first command on a new DuckDB file makes its folder
        warehouse.duckdb_path.parent.mkdir(parents=True, exist_ok=True)
    with warehouse.transaction() as cur:
        # two first runs at once: the second waits (PostgreSQL's IF NOT EXISTS is not race-free), then reads the
        # first one's mark
        warehouse.serialise(cur, f"{OPS_SCHEMA}.{MARKER_TABLE}")
        warehouse.ensure_schema(cur, OPS_SCHEMA)
        cur.execute(create)
        cur.execute(f"SELECT environment FROM {OPS_SCHEMA}.{MARKER_TABLE} ORDER BY marked_at LIMIT 1")
        row = cur.fetchone()
        if row is None:
            p = warehouse.placeholder
            cur.execute(insert + f"({p}, current_timestamp, {p})", (warehouse.environment, _marked_by()))
            marked = warehouse.environment
        else:
            marked = str(row[0])
    if marked != warehouse.environment:
        raise EnvironmentMismatch(mismatch_message(warehouse, marked))
    return marked


def mismatch_message(warehouse: Warehouse, marked: str) -> str:
    """Why the command stopped and the two ways out."""
    selected = warehouse.environment
    section = f"{selected.upper()}__DESTINATION__{warehouse.target.upper()}__CREDENTIALS"
    return (
        f"refused: DATAMART_ENV={selected} but the warehouse {warehouse.describe()} is the {marked} warehouse "
        f"({OPS_SCHEMA}.{MARKER_TABLE} = '{marked}'). Nothing was read or written. These are {marked} credentials: "
        f"to work on {marked}, set DATAMART_ENV={marked}; to work on {selected}, give {selected} its own warehouse "
        f"({section}, or [{selected}.destination.{warehouse.target}] credentials in .dlt/secrets.toml)."
    )
