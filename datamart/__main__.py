"""Command line: ``python -m datamart run|scheduled|promote|review|query|env|privacy|sqlmesh``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import psycopg2
from sqlmesh.cli.main import cli as sqlmesh_cli
from sqlmesh.utils.errors import SQLMeshError

from datamart import logs, scheduled
from datamart.alerts import redact as alert_redact
from datamart.environments import check_environment
from datamart.errors import root_cause
from datamart.flow import RunFailed, run_flow
from datamart.gate.checks import GateError
from datamart.ingest.declarations import DeclarationError
from datamart.privacy.cli import add_privacy_parser, privacy_command
from datamart.redact import redact
from datamart.review.cli import review_command
from datamart.settings import (
    PROJECT_ROOT,
    TARGETS,
    SettingsError,
    Warehouse,
    configure_environment,
    keep_files_private,
    resolve_warehouse,
)
from datamart.transform import apply_prod


def _parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per entry of :data:`COMMANDS` (and ``scheduled``)."""
    parser = argparse.ArgumentParser(prog="python -m datamart", description=__doc__)
    parser.add_argument("--target", choices=TARGETS, help="warehouse (default: DATAMART_TARGET or duckdb)")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show dlt's and SQLMesh's own logs (always in data/logs/)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="load every pipeline, then build and promote the datamart to prod")
    run.add_argument("--demo", action="store_true", help="generate the demo source and a local key if missing")
    scheduled = commands.add_parser(
        "scheduled", help="the scheduled job: every pipeline, SQLMesh run of prod (no promotion); alerts on failure"
    )
    scheduled.add_argument("--only", action="append", metavar="STEP", help="run only this step (repeatable)")
    scheduled.add_argument("--skip", action="append", metavar="STEP", help="leave this step out (repeatable)")
    scheduled.add_argument("--retries", type=int, default=3, help="attempts per pipeline on transient errors")
    scheduled.add_argument("--pipeline", action="append", metavar="NAME", help="only this pipeline (repeatable)")
    scheduled.add_argument("--no-alert", action="store_true", help="do not post the alert (e.g. a try to be retried)")
    scheduled.add_argument(
        "--execution-time", help="SQLMesh's 'now' for the run, to catch up missed days (default: the clock)"
    )
    commands.add_parser("promote", help="apply the models to prod (audits, views swapped) and Metabase's grants")
    review = commands.add_parser("review", help="build this branch beside prod and write the pull-request report")
    review.add_argument("--env", help="SQLMesh environment to build the branch in (default: pr_<git branch>)")
    review.add_argument("--project", type=Path, help="SQLMesh project folder to review (default: this repository)")
    review.add_argument(
        "--output", type=Path, help="where to write the Markdown report (default: data/review/review.md)"
    )
    review.add_argument("--forward-only", action="store_true", help="plan the change as forward-only, as prod would")
    query = commands.add_parser("query", help="run one SQL query on the selected warehouse and print the rows")
    query.add_argument("sql")
    commands.add_parser("env", help="print the selected warehouse and how dlt and SQLMesh reach it (no password)")
    add_privacy_parser(commands)
    passthrough = commands.add_parser("sqlmesh", help="run the sqlmesh CLI against the selected warehouse")
    passthrough.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen command; returns the exit code.

    Each command returns its exit code or raises; a failure it raises is reported by :data:`FAILURES` (message on
    stderr, exit code), and any other exception propagates (Python's traceback, exit 1): no path ends in 0 unless the
    command returned 0.
    """
    args = _parser().parse_args(argv)
    keep_files_private()
    configure_environment()
    if args.command in LOGGED:
        logs.setup(args.command, verbose=args.verbose)
    if args.command == "scheduled":
        return _scheduled(args)
    warehouse = None
    try:
        warehouse = resolve_warehouse(args.target)
        if args.command != "env":
            check_environment(warehouse)
        return COMMANDS[args.command](args, warehouse)
    except REPORTED as exc:
        code, message = _failure(exc, warehouse)
        print(message, file=sys.stderr)
        return code
    finally:
        if args.command in LOGGED:
            print(logs.log_line(), flush=True)


def _run(args: argparse.Namespace, warehouse: Warehouse) -> int:
    """``run``: every pipeline, then the prod plan (a failure raises RunFailed)."""
    run_flow(warehouse, demo=args.demo)
    return 0


def _promote(args: argparse.Namespace, warehouse: Warehouse) -> int:
    """``promote``: the prod plan and Metabase's grants, then what Metabase reads."""
    result = apply_prod(warehouse)
    print(f"Promoted to prod in {result.elapsed:.1f}s. Warehouse: {warehouse.describe()}")
    print(result.built_line())
    print(f"Audits passed: {result.audits_passed}")
    print(f"Published views (what Metabase reads): {', '.join(result.published_views)}")
    if result.grants is not None:
        print(result.grants.format())
    return 0


def _review(args: argparse.Namespace, warehouse: Warehouse) -> int:
    return review_command(warehouse, args.env, args.project, args.output, args.forward_only)


def _env(args: argparse.Namespace, warehouse: Warehouse) -> int:
    """``env``: the selected warehouse, password left out."""
    print(f"DATAMART_TARGET={warehouse.target}")
    print(f"DATAMART_ENV={warehouse.environment}")
    print(f"warehouse: {warehouse.describe()}")
    print("dlt and plain `sqlmesh` (config.py) both resolve it from dlt's configuration and secrets")
    return 0


def _sqlmesh(args: argparse.Namespace, warehouse: Warehouse) -> int:
    """``sqlmesh …``: the sqlmesh CLI on the selected warehouse (plain `sqlmesh` from the project root does the same:
    config.py resolves this warehouse)."""
    os.environ.update(warehouse.environment_variables())
    os.chdir(PROJECT_ROOT)
    return int(sqlmesh_cli.main(args=args.args, prog_name="sqlmesh", standalone_mode=False) or 0)


def _unreachable(exc: BaseException, warehouse: Warehouse | None) -> str:
    return redact(
        f"error: the warehouse could not be reached ({warehouse.describe() if warehouse else '?'}): "
        f"{root_cause(exc)}\n"
        "Check its credentials (DESTINATION__POSTGRES__CREDENTIALS or [destination.postgres] in "
        ".dlt/secrets.toml) and that it is up, then rerun the same command; prod views were not changed."
    )


# A refused login or a server that is down, as psycopg2 reports it (directly or from inside SQLMesh).
WAREHOUSE_UNREACHABLE = (psycopg2.OperationalError,)

#: The commands whose libraries' logs go to a file under data/logs/ (``query`` and ``env`` print only their answer;
#: ``sqlmesh`` is SQLMesh's own command line, which configures its own logs).
LOGGED = {"run", "scheduled", "promote", "review", "privacy"}

#: The commands that run on a resolved warehouse: each returns its exit code.
COMMANDS: dict[str, Callable[[argparse.Namespace, Warehouse], int]] = {
    "run": _run,
    "promote": _promote,
    "review": _review,
    "query": lambda args, warehouse: _query(warehouse, args.sql),
    "privacy": lambda args, warehouse: privacy_command(args, warehouse),
    "env": _env,
    "sqlmesh": _sqlmesh,
}

#: The failures a command reports, first match wins: (exception types, exit code, the message on stderr).
FAILURES: list[tuple[tuple[type[BaseException], ...], int, Callable[[BaseException, Warehouse | None], str]]] = [
    ((GateError,), 1, lambda exc, _: f"error: {exc}\nRun `make review` for the full report."),
    ((SettingsError, DeclarationError), 2, lambda exc, _: f"error: {exc}"),
    ((RunFailed,), 1, lambda exc, _: str(exc)),
    (WAREHOUSE_UNREACHABLE, 1, _unreachable),
    (
        (SQLMeshError,),
        1,
        lambda exc, _: (
            f"error: SQLMesh stopped, prod views were not changed: {exc}\n"
            'Inspect with `make sqlmesh ARGS="plan"` (or `ARGS=test`, `ARGS=audit`).'
        ),
    ),
]
REPORTED = tuple(kind for kinds, _, _ in FAILURES for kind in kinds)


def _failure(exc: BaseException, warehouse: Warehouse | None) -> tuple[int, str]:
    """The exit code and message of a reported failure (one of :data:`REPORTED`)."""
    code, message = next((code, message) for kinds, code, message in FAILURES if isinstance(exc, kinds))
    return code, message(exc, warehouse)


def _scheduled(args: argparse.Namespace) -> int:
    """``python -m datamart scheduled``: exit 0 ok, 1 a step failed, 2 bad input; the summary on stdout."""
    environment = os.environ.get("DATAMART_ENV") or "dev"
    try:
        names = scheduled.step_names()
        unknown = [n for n in (args.only or []) + (args.skip or []) if n not in names]
        if unknown:
            raise SettingsError(f"unknown step(s) {', '.join(unknown)}; the steps are {', '.join(names)}")
        steps = [
            s for s in scheduled.STEPS if s.__name__ in (args.only or names) and s.__name__ not in (args.skip or [])
        ]
        warehouse = resolve_warehouse(args.target)
        environment = warehouse.environment
        try:
            check_environment(warehouse)
        except SettingsError:
            raise
        except Exception as exc:  # noqa: BLE001 - the warehouse is unreachable: a failed run, alerted like the others
            run = scheduled.warehouse_unreachable(warehouse, exc)
        else:
            run = scheduled.run_scheduled(
                warehouse,
                steps,
                attempts=max(1, args.retries),
                execution_time=args.execution_time,
                pipeline_names=args.pipeline,
            )
    except (SettingsError, DeclarationError) as exc:
        print(f"error: {alert_redact(str(exc))}", file=sys.stderr)
        sent = "alert not posted (--no-alert)" if args.no_alert else scheduled.send_input_alert(environment, exc)
        print(f"result: FAILED before any step, {sent}", file=sys.stderr)
        return 2
    if args.no_alert:
        run.alert = "alert not posted (--no-alert)" if run.failures else ""
    else:
        scheduled.send_alert(run)
    print(logs.log_line())
    print(scheduled.summary(run))  # its last line is the result, which cron mail and scripts read
    return 1 if run.failures else 0


def _query(warehouse: Warehouse, sql: str) -> int:
    """``python -m datamart query``: a header line, the rows tab-separated, their count; exit 1 on a SQL error."""
    import duckdb

    try:
        columns, rows = warehouse.query_with_columns(sql)
    except (duckdb.Error, psycopg2.Error) as exc:
        if isinstance(exc, WAREHOUSE_UNREACHABLE) and not isinstance(exc, psycopg2.errors.QueryCanceled):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: the query failed on {warehouse.describe()}: {message}", file=sys.stderr)
        return 1
    try:
        print_rows(columns, rows)
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader stopped early (`… | head`): not an error of the query; keep Python quiet at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def print_rows(columns: list[str], rows: list[tuple[object, ...]]) -> None:
    """A header line, the rows as tab-separated lines, then their count."""
    if columns:
        print("\t".join(columns))
    for row in rows:
        print("\t".join("" if value is None else str(value) for value in row))
    print(f"({len(rows)} rows)")


if __name__ == "__main__":
    sys.exit(main())
