"""``python -m datamart privacy check|erased|register``."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

from datamart.settings import Warehouse, duckdb_warehouse


def add_privacy_parser(commands: Any) -> None:
    """The ``privacy`` command and its operations, on the main parser's subcommands."""
    privacy = commands.add_parser("privacy", help="privacy guarantees: lineage check, erasure check, register")
    operations = privacy.add_subparsers(dest="privacy_command", required=True)
    operations.add_parser("check", help="fail if a published column derives from a personal column without allowance")
    erased = operations.add_parser("erased", help="list every place where a source key erased in the source remains")
    erased.add_argument("pipeline")
    erased.add_argument("table")
    erased.add_argument("key", help="the primary key value of the erased row")
    erased.add_argument(
        "--value",
        action="append",
        default=[],
        metavar="COLUMN=CLEAR",
        help="a clear value of a hashed column (e.g. email=jane@example.org): its pseudonym is searched everywhere",
    )
    register = operations.add_parser("register", help="write docs/personal-data.md (the personal-data register)")
    register.add_argument("--check", action="store_true", help="only fail if the committed register is stale")


def offline_context() -> Any:
    """A SQLMesh context on the project that reads no warehouse (a throwaway DuckDB file): models and lineage only."""
    from datamart.transform import sqlmesh_context

    folder = Path(tempfile.mkdtemp(prefix="datamart-privacy-"))
    return sqlmesh_context(duckdb_warehouse(folder / "warehouse.duckdb"))


def privacy_command(args: argparse.Namespace, warehouse: Warehouse, out: TextIO | None = None) -> int:
    """Run one privacy operation; returns the exit code (0 when the guarantee holds, 1 when it does not)."""
    out = out or sys.stdout
    if args.privacy_command == "check":
        return check_command(offline_context(), out)
    if args.privacy_command == "register":
        from datamart.grants import metabase_role_name
        from datamart.privacy.register import REGISTER_PATH, render_register

        text = render_register(offline_context(), metabase_role_name())
        if args.check:
            if not REGISTER_PATH.exists() or REGISTER_PATH.read_text(encoding="utf-8") != text:
                print(f"{REGISTER_PATH.name} is stale: run `make privacy-register` and commit it", file=out)
                return 1
            print(f"{REGISTER_PATH.name} is up to date", file=out)
            return 0
        REGISTER_PATH.write_text(text, encoding="utf-8")
        print(f"wrote {REGISTER_PATH}", file=out)
        return 0
    from datamart.privacy.erasure import find_traces

    values = {}
    for item in args.value:
        column, sep, clear = item.partition("=")
        if not sep:
            from datamart.ingest.declarations import DeclarationError

            raise DeclarationError(f"--value {item!r}: write COLUMN=CLEAR_VALUE, e.g. --value email=jane@example.org")
        values[column.strip()] = clear
    traces = find_traces(warehouse, args.pipeline, args.table, args.key, values)
    what = f"{args.pipeline}.{args.table} key {args.key}" + "".join(f", {c} pseudonym" for c in values)
    if not traces:
        print(f"erased: no trace of {what} in {warehouse.describe()} nor in the pipeline's working dir", file=out)
        return 0
    print(f"NOT erased: {len(traces)} trace(s) of {what} remain:", file=out)
    for trace in traces:
        print(f"  {trace.format()}", file=out)
    print(
        "what to do: delete the row in the source, then run the pipeline and SQLMesh again (python -m datamart run); "
        "old SQLMesh versions go with `make sqlmesh ARGS=janitor`",
        file=out,
    )
    return 1


def check_command(context: Any, out: TextIO | None = None) -> int:
    """Print every published column deriving from personal data; 1 if any is not allowed."""
    out = out or sys.stdout
    from datamart.gate.base import GateInput
    from datamart.gate.lineage import check_published_lineage, dropped_columns_loaded, violations
    from datamart.gate.small_cells import check_small_cells

    findings = check_published_lineage(context)
    leaks = dropped_columns_loaded(context) + [v.message for v in check_small_cells(GateInput(context=context))]
    for finding in findings:
        print(f"{'ok  ' if finding.allowed else 'FAIL'} {finding.message}", file=out)
    for leak in leaks:
        print(f"FAIL {leak}", file=out)
    refused = violations(findings)
    if refused or leaks:
        print(f"privacy check failed: {len(refused) + len(leaks)} personal data use(s) not allowed", file=out)
        return 1
    print(f"privacy check passed: {len(findings)} published column(s) derive from personal data, all allowed", file=out)
    return 0
