"""``dlt pipeline <name> run``, ``verify`` and ``drop-replication``: dlt's CLI plugins for declared pipelines
(registered in pyproject.toml).

Open-source dlt has no ``run`` operation; its CLI loads plugins from the ``dlt`` entry-point group and its ``pipeline``
command composes additively, so this module adds ``run`` beside ``info``, ``show``, ``drop``…

It also gives dlt a run context for this project (hook ``plug_run_context``): inside the project, dlt's data dir is
``data/dlt`` and its default pipelines dir is the project's working dirs for the selected warehouse
(``data/dlt/pipelines/<target>``, see :func:`datamart.settings.pipelines_dir_for`), so dlt's own commands
(``dlt pipeline app_db info|trace|show|…``, ``dlt pipeline --list-pipelines``) find the pipelines that ``run``
created, without ``--pipelines-dir``. And the dlt CLI creates its files private to their owner, like every entry
point of the project (:func:`datamart.settings.keep_files_private`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from dlt.common.configuration import plugins
from dlt.common.runtime.run_context import RunContext

from datamart.settings import (
    DATA_DIR,
    PROJECT_ROOT,
    TARGETS,
    SettingsError,
    keep_files_private,
    pipelines_dir_for,
    selected_environment,
    selected_target,
)


class ProjectRunContext(RunContext):
    """dlt's run context inside this project: data under ``data/dlt``, pipelines in the project's working dirs."""

    @property
    def data_dir(self) -> str:
        """``DLT_DATA_DIR`` if set, else ``data/dlt`` of the project (dlt's default is the user's home)."""
        return os.environ.get("DLT_DATA_DIR") or str(DATA_DIR / "dlt")

    def get_data_entity(self, entity: str) -> str:
        """The pipelines dir of the selected target and environment (``DATAMART_TARGET``, ``DATAMART_ENV``)."""
        if entity == "pipelines":
            try:
                return str(pipelines_dir_for(selected_target(), selected_environment()))
            except SettingsError:  # a wrong DATAMART_TARGET/ENV: dlt's default, our commands say what is wrong
                pass
        return os.path.join(self.data_dir, entity)


def _in_project(run_dir: str | None) -> bool:
    here = Path(os.path.abspath(run_dir or "."))
    return here == PROJECT_ROOT or PROJECT_ROOT in here.parents


@plugins.hookimpl(specname="plug_run_context", tryfirst=True)
def plug_run_context_datamart(run_dir: str | None, runtime_kwargs: dict[str, Any] | None) -> Any:
    """This project's run context when dlt runs inside it (else dlt's own contexts decide)."""
    if runtime_kwargs or not _in_project(run_dir):
        return None
    return ProjectRunContext(run_dir)


class RunCommand:
    """The ``run`` operation of ``dlt pipeline``."""

    command = "run"
    parent = "pipeline"
    compose = "replace"
    help_string = "Run a declared pipeline (pipelines/<name>.yaml, or 'all'): extract, pseudonymise, load"
    description = (
        "Runs the pipeline declared in pipelines/<name>.yaml into the warehouse selected by DATAMART_TARGET "
        "(DuckDB by default). Use `dlt pipeline all run` for every declared pipeline. Run it from the project root."
    )
    docs_url = None

    def configure_parser(self, parser: argparse.ArgumentParser) -> None:
        """Options of ``dlt pipeline <name> run``."""
        parser.add_argument("--table", action="append", dest="tables", metavar="TABLE", help="only this table")
        _add_verbose(parser)
        parser.add_argument(
            "--full-refresh",
            action="store_true",
            help="drop the selected tables (all without --table) and their incremental state, then reload them",
        )
        parser.add_argument("--target", choices=TARGETS, help="warehouse (default: DATAMART_TARGET)")
        parser.add_argument("--dry-run", action="store_true", help="print what would be loaded; load nothing")
        parser.add_argument("--retries", type=int, default=3, help="attempts on transient errors (default 3)")
        parser.add_argument(
            "--wait",
            type=float,
            default=0.0,
            metavar="SECONDS",
            help="when another run of the pipeline holds its lock, wait up to SECONDS (default 0: refuse at once)",
        )

    def execute(self, args: argparse.Namespace) -> None:
        """Run, then exit non-zero with the reason when anything failed."""
        from datamart.ingest.cli import run_command

        _start_logging("run", args)
        code = run_command(
            name=args.pipeline_name,
            tables=args.tables,
            full_refresh=args.full_refresh,
            target=args.target,
            dry_run=args.dry_run,
            attempts=max(1, args.retries),
            pipelines_dir=Path(args.pipelines_dir) if getattr(args, "pipelines_dir", None) else None,
            wait=args.wait,
        )
        _print_log_line()
        if code:
            sys.exit(code)


class VerifyCommand:
    """The ``verify`` operation of ``dlt pipeline``: reconcile the warehouse with the source."""

    command = "verify"
    parent = "pipeline"
    compose = "replace"
    help_string = "Compare a declared pipeline's tables with its source: counts, key sets, checksums per key range"
    description = (
        "Compares every declared table of pipelines/<name>.yaml (or 'all') with its source: row counts, the keys "
        "missing from or extra in the warehouse, and a checksum of the non-personal columns per key range. Exits 1 "
        "on drift, naming the table and the command that fixes it. --repair reloads the key ranges that differ "
        "(personal columns treated as in a run, the cursor untouched), then compares again: exit 0 when equal. "
        "--full-compare reloads one table from scratch into a scratch dataset and diffs it with the incrementally "
        "maintained one."
    )
    docs_url = None

    def configure_parser(self, parser: argparse.ArgumentParser) -> None:
        """Options of ``dlt pipeline <name> verify``."""
        parser.add_argument("--table", action="append", dest="tables", metavar="TABLE", help="only this table")
        _add_verbose(parser)
        parser.add_argument("--target", choices=TARGETS, help="warehouse (default: DATAMART_TARGET)")
        parser.add_argument(
            "--full-compare",
            action="store_true",
            help="reload --table from scratch into <dataset>_verify (dropped after) and diff it with the warehouse",
        )
        parser.add_argument(
            "--repair",
            action="store_true",
            help="reload the differing key ranges from the source (upsert, and delete keys gone from it), verify again",
        )
        parser.add_argument("--chunk-size", type=int, help="source rows read per keyed query (default 50000)")
        parser.add_argument(
            "--wait", type=float, default=0.0, metavar="SECONDS", help="wait for a running load up to SECONDS"
        )

    def execute(self, args: argparse.Namespace) -> None:
        """Verify, then exit 1 on drift (3 when a run holds the lock, 2 on wrong input)."""
        from datamart.ingest.cli import verify_command

        _start_logging("verify", args)
        code = verify_command(
            name=args.pipeline_name,
            tables=args.tables,
            target=args.target,
            full_compare=args.full_compare,
            chunk_size=args.chunk_size,
            wait=args.wait,
            repair=args.repair,
            pipelines_dir=Path(args.pipelines_dir) if getattr(args, "pipelines_dir", None) else None,
        )
        _print_log_line()
        if code:
            sys.exit(code)


class DropReplicationCommand:
    """The ``drop-replication`` operation of ``dlt pipeline``: remove a replication pipeline's slot and publication."""

    command = "drop-replication"
    parent = "pipeline"
    compose = "replace"
    help_string = "Remove a replication pipeline's slot and publication from its source (the next run copies again)"
    description = (
        "For a pipeline declared with `changes: replication`: drops its logical replication slot (which keeps WAL on "
        "the source until read) and its publication, and forgets which tables were copied, so that the next run "
        "starts with a fresh copy. Idempotent. When the source user lacks the privileges, exits 2 with the SQL a DBA "
        "runs."
    )
    docs_url = None

    def configure_parser(self, parser: argparse.ArgumentParser) -> None:
        """Options of ``dlt pipeline <name> drop-replication``."""
        _add_verbose(parser)
        parser.add_argument("--target", choices=TARGETS, help="warehouse (default: DATAMART_TARGET)")
        parser.add_argument(
            "--wait", type=float, default=0.0, metavar="SECONDS", help="wait for a running load up to SECONDS"
        )

    def execute(self, args: argparse.Namespace) -> None:
        """Drop, then exit non-zero when something is left (2: privileges, with the SQL; 3: a run holds the lock)."""
        from datamart.ingest.cli import drop_replication_command

        _start_logging("drop-replication", args)
        code = drop_replication_command(
            name=args.pipeline_name,
            target=args.target,
            wait=args.wait,
            pipelines_dir=Path(args.pipelines_dir) if getattr(args, "pipelines_dir", None) else None,
        )
        if code:
            sys.exit(code)


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show dlt's and SQLMesh's own logs (always in data/logs/)"
    )


def _start_logging(command: str, args: argparse.Namespace) -> None:
    """Quiet console, full log file (datamart/logs.py); the file is named on the last line of the output."""
    from datamart.logs import setup

    setup(f"dlt-{command}", verbose=getattr(args, "verbose", False))


def _print_log_line() -> None:
    from datamart.logs import log_line

    print(log_line())


@plugins.hookimpl(specname="plug_cli")
def plug_cli_datamart_run(host: str) -> Any:
    """Register ``run`` under ``dlt pipeline`` (the ``dlt`` host only)."""
    if host == "dlt":
        keep_files_private()  # the dlt CLI is an entry point: load packages, traces and state owner-only
    return RunCommand if host == "dlt" else None


@plugins.hookimpl(specname="plug_cli")
def plug_cli_datamart_verify(host: str) -> Any:
    """Register ``verify`` under ``dlt pipeline`` (the ``dlt`` host only)."""
    return VerifyCommand if host == "dlt" else None


@plugins.hookimpl(specname="plug_cli")
def plug_cli_datamart_drop_replication(host: str) -> Any:
    """Register ``drop-replication`` under ``dlt pipeline`` (the ``dlt`` host only)."""
    return DropReplicationCommand if host == "dlt" else None
