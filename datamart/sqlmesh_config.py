"""SQLMesh's configuration, built from the warehouse dlt resolves: one source of truth for both tools.

The project root's ``config.py`` is ``config = sqlmesh_config()``: SQLMesh loads it for every command typed from the
project root (``sqlmesh info``, ``sqlmesh plan``, ``sqlmesh table_diff``), so plain ``sqlmesh`` reaches the warehouse
that ``dlt pipeline <name> run`` writes to, from the same settings (``DATAMART_TARGET``, ``DATAMART_ENV``,
``.dlt/secrets.toml`` / ``.dlt/config.toml`` / ``DESTINATION__<TARGET>__CREDENTIALS``), with no wrapper and no
variable of its own. :func:`datamart.transform.sqlmesh_context` passes the same object for an explicit warehouse.

Only the selected warehouse is declared as a gateway: SQLMesh opens a connection to EVERY gateway of the config when
it loads the project (to learn each one's default catalog), so declaring both would make every local command need a
reachable PostgreSQL, and every PostgreSQL command create a stray DuckDB file.

Do not add a ``.env`` file to the project root: SQLMesh loads it before this config and it could contradict the
settings above.
"""

from __future__ import annotations

from typing import Any

from datamart.settings import Warehouse, configure_environment, resolve_warehouse

DEFAULT_STATE_SCHEMA = "sqlmesh"
# The first day of the demo's history: every model's start (SQLMesh's model_defaults) and variable project_start.
PROJECT_START = "2025-10-01"
# SQLMesh's linter, run by `sqlmesh lint` and before every `sqlmesh plan`: an error stops the plan. The last
# rules are the project's own: the modelling conventions (linter/conventions.py) and the review gate of
# `make review`, inside SQLMesh (linter/gate.py).
LINTER_RULES = [
    "noselectstar",
    "nomissingaudits",
    "ambiguousorinvalidcolumn",
    "invalidselectstarexpansion",
    "noambiguousprojections",
    "nomissingexternalmodels",
    "publisheddescribed",
    "publishedaudited",
    "layernaming",
    "reviewgate",
]


def state_schema() -> str:
    """SQLMesh's state schema on PostgreSQL: dlt config ``datamart.sqlmesh_state_schema``, default ``sqlmesh``.

    Two SQLMesh projects must never share one state schema in one database (a prod plan of one drops the other's
    views); tests give each project its own (``DATAMART__SQLMESH_STATE_SCHEMA``).
    """
    import dlt

    configure_environment()
    value = dlt.config.get("datamart.sqlmesh_state_schema")
    return str(value).strip() if value not in (None, "") else DEFAULT_STATE_SCHEMA


def gateway(warehouse: Warehouse) -> tuple[str, dict[str, Any]]:
    """The name and settings of the one gateway reaching ``warehouse``."""
    return warehouse.sqlmesh_gateway(state_schema())


def sqlmesh_config(warehouse: Warehouse | None = None) -> Any:
    """SQLMesh's ``Config`` for ``warehouse`` (default: the one dlt's configuration selects)."""
    from sqlmesh.core.config import Config

    if warehouse is None:
        # What the user's settings select (config.py): the warehouse must belong to DATAMART_ENV, as for every
        # other command (datamart/environments.py): prod credentials in a dev shell stop here, before any plan.
        from datamart.environments import check_environment

        warehouse = resolve_warehouse()
        check_environment(warehouse)
    name, settings = gateway(warehouse)
    return Config.parse_obj(
        {
            "gateways": {name: settings},
            "default_gateway": name,
            # Unit tests (tests/test_*.yaml) run on an in-memory DuckDB whatever the gateway: they test the logic.
            "default_test_connection": {"type": "duckdb"},
            "model_defaults": {
                # Models are written in DuckDB's dialect, using only SQL SQLMesh transpiles correctly to PostgreSQL.
                "dialect": "duckdb",
                "start": PROJECT_START,
                "cron": "@daily",
                # An incremental table never loses a column silently; a removed column means a new version (_v2).
                "on_destructive_change": "error",
            },
            # Small-cell suppression (macros/privacy.py, audits/assert_no_small_cells.sql): a published aggregate
            # never shows a group of fewer people than this.
            # project_start: an incremental-by-key mart computes everything when its interval starts there (a first
            # build or SQLMesh's whole restatement), only the touched keys after (models/marts/missions_v1.sql).
            "variables": {"small_cell_threshold": 5, "project_start": PROJECT_START},
            "linter": {"enabled": True, "rules": LINTER_RULES},
            # The review gate where no linter flag reaches (`sqlmesh plan --skip-linter`): at the start of every prod
            # plan and run, then the contract recorded at their end (macros/published.py, datamart/gate/published.py).
            "before_all": ["@published_gate()"],
            "after_all": ["@record_published_contract()"],
            # SQLMesh's anonymous usage analytics: off on every machine, not only in CI.
            "disable_anonymized_analytics": True,
        }
    )
