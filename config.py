"""SQLMesh's project configuration: the warehouse dlt resolves (datamart/sqlmesh_config.py), no credential here.

`sqlmesh <anything>` typed from this folder reaches the same warehouse as `dlt pipeline <name> run`: DATAMART_TARGET
(duckdb, the default, or postgres) is the one switch, and the credentials are read the dlt way only
(DESTINATION__POSTGRES__CREDENTIALS, or [destination.postgres] in .dlt/secrets.toml; DATAMART_ENV selects an
environment's own section). Gateways, state schema, model defaults, variables and linter rules are in
datamart/sqlmesh_config.py.
"""

from datamart.sqlmesh_config import sqlmesh_config

config = sqlmesh_config()
