"""Command line: ``python -m datamart run|sqlmesh|env``."""

from __future__ import annotations

import argparse
import os
import sys

from sqlmesh.utils.errors import SQLMeshError

from datamart.flow import RunFailed
from datamart.ingest.declarations import DeclarationError
from datamart.settings import (
    PROJECT_ROOT,
    TARGETS,
    SettingsError,
    configure_environment,
    resolve_warehouse,
)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen command; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m datamart", description=__doc__)
    parser.add_argument("--target", choices=TARGETS, help="warehouse (default: DATAMART_TARGET or duckdb)")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="load every pipeline, then build and promote the datamart to prod")
    run.add_argument("--demo", action="store_true", help="generate the demo source and a local key if missing")
    commands.add_parser("promote", help="apply the models to prod (audits, views swapped) and Metabase's grants")
    query = commands.add_parser("query", help="run one SQL query on the selected warehouse and print the rows")
    query.add_argument("sql")
    commands.add_parser("env", help="print the DATAMART_* variables SQLMesh's config.yaml reads (no password)")
    passthrough = commands.add_parser("sqlmesh", help="run the sqlmesh CLI against the selected warehouse")
    passthrough.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    configure_environment()
    try:
        warehouse = resolve_warehouse(args.target)
        if args.command == "run":
            from datamart.flow import run_flow

            run_flow(warehouse, demo=args.demo)
        elif args.command == "promote":
            from datamart.transform import apply_prod

            result = apply_prod(warehouse)
            built = ", ".join(result.models_built) or "none (prod already matches the project)"
            print(f"Promoted to prod in {result.elapsed:.1f}s. Warehouse: {warehouse.describe()}")
            print(f"Models built: {len(result.models_built)} ({built})")
            print(f"Audits passed: {result.audits_passed}")
            print(f"Published views (what Metabase reads): {', '.join(result.published_views)}")
            if result.grants is not None:
                print(result.grants.format())
        elif args.command == "query":
            print_rows(warehouse.query(args.sql))
        elif args.command == "env":
            for key, value in warehouse.sqlmesh_env().items():
                print(f"{key}={'***' if 'PASSWORD' in key else value}")
        else:
            warehouse.export_for_sqlmesh()
            os.chdir(PROJECT_ROOT)
            from sqlmesh.cli.main import cli

            return int(cli.main(args=args.args, prog_name="sqlmesh", standalone_mode=False) or 0)
    except (SettingsError, DeclarationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        print(exc, file=sys.stderr)
        return 1
    except SQLMeshError as exc:
        print(
            f"error: SQLMesh stopped, prod views were not changed: {exc}\n"
            'Inspect with `make sqlmesh ARGS="plan"` (or `ARGS=test`, `ARGS=audit`).',
            file=sys.stderr,
        )
        return 1
    return 0


def print_rows(rows: list[tuple[object, ...]]) -> None:
    """Rows as tab-separated lines, then their count."""
    for row in rows:
        print("\t".join("" if value is None else str(value) for value in row))
    print(f"({len(rows)} rows)")


if __name__ == "__main__":
    sys.exit(main())
