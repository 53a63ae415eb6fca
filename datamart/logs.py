"""What a command prints, and what it logs: quiet by default, everything in a log file.

Each command of ours (``python -m datamart …``, ``dlt pipeline <name> run|verify|…``) calls :func:`setup` first:

- the console (stderr) shows warnings and errors only; with ``-v`` (or ``DATAMART_VERBOSE=1``) it shows SQLMesh's
  and dlt's INFO logs too;
- a log file under ``data/logs/`` gets every INFO record of every library (SQLMesh's executed SQL, dlt's steps,
  the load progress), whatever the console shows; the summaries name it (:func:`log_line`), the last
  :data:`KEEP` files are kept.

Why this module is needed at all: SQLMesh's analytics module calls ``logging.info`` on the root logger at import,
and Python's ``logging.info`` then installs a stderr handler with no level (``basicConfig``); as soon as anything
sets a ``sqlmesh`` logger to INFO (we do, to collect audit failures: ``transform.audits_named_on_failure``), every
executed statement was printed (743 lines on a first ``make run``). With handlers of ours on the root logger first,
``basicConfig`` does nothing. dlt logs through its own logger (``dlt``, not propagated): it gets the same two
handlers, and its level is INFO for our commands (``RUNTIME__LOG_LEVEL``, unless the user sets it).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from datamart.settings import DATA_DIR

#: How often a load's progress is logged outside a terminal (seconds).
PROGRESS_SECONDS = 15.0
#: The log files kept under ``data/logs/`` (older ones are removed when a command starts).
KEEP = 30
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_current: Path | None = None


class _Noise(logging.Filter):
    """Warnings understood and harmless, kept out of the console (they stay in the log file); each says why.

    - sqlglot's "EXTRACT from TIMESTAMPTZ / TIMESTAMPLTZ may produce different results": sqlglot warns when it
      writes DuckDB SQL because *Snowflake* would apply its server's time zone; our models are written in DuckDB's
      dialect and ``EXTRACT(EPOCH FROM …)`` of a timestamp with time zone is an absolute number in DuckDB and
      PostgreSQL alike.
    - dlt's "The "hard_delete" column hint … with write disposition "replace" … will be ignored": a table reloaded
      whole (schema change, ``--full-refresh``) is replaced through staging, and the runner leaves the rows carrying
      the soft-delete marker out of that load first (``runner._soft_deleted_out``): nothing is ignored.
    - dlt's "when merging arrow schema with dlt schema, several column hints were different", when every difference
      dlt found (its INFO lines just before, see :class:`_ArrowHints`) is a key column declared NOT NULL while the
      arrow batch says nullable: arrow readers mark every field nullable; dlt keeps the declared NOT NULL, and a
      null key would fail the load loudly anyway. Any other difference is shown.
    """

    MESSAGES = (
        "EXTRACT from TIMESTAMPTZ / TIMESTAMPLTZ may produce different results",
        'with write disposition "replace"',
    )

    def __init__(self) -> None:
        super().__init__()
        self.shown: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "datamart_understood", False):
            return False
        message = record.getMessage()
        if any(noise in message for noise in self.MESSAGES) or message in self.shown:
            return False  # a warning repeated (one per batch of a table) is shown once; the log file has each
        self.shown.add(message)
        return True


class _ArrowHints(logging.Filter):
    """On dlt's logger: reads dlt's INFO lines on arrow hint differences and marks its warning that follows as
    understood when every difference was a NOT NULL key that arrow calls nullable (see :class:`_Noise`). Lets every
    record through (the log file keeps them all)."""

    DETAIL = re.compile(
        r"In resource: (?P<resource>\S+), when merging arrow schema on column \S+\. The hint (?P<hint>\w+) value "
        r"(?P<declared>\S+) defined in resource will overwrite arrow hint with value (?P<arrow>\S+)\."
    )
    SUMMARY = re.compile(r"In resource: (?P<resource>\S+), when merging arrow schema with dlt schema, several")

    def __init__(self) -> None:
        super().__init__()
        self.benign: dict[str, bool] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if detail := self.DETAIL.match(message):
            harmless = detail["hint"] == "nullable" and (detail["declared"], detail["arrow"]) == ("False", "True")
            self.benign[detail["resource"]] = self.benign.get(detail["resource"], True) and harmless
        elif summary := self.SUMMARY.match(message):
            record.datamart_understood = self.benign.pop(summary["resource"], False)
        return True


def verbose_requested(flag: bool = False) -> bool:
    """``-v`` on the command line, or ``DATAMART_VERBOSE`` set to 1/true/yes."""
    return flag or os.environ.get("DATAMART_VERBOSE", "").strip().lower() in ("1", "true", "yes")


def setup(command: str, verbose: bool = False) -> Path:
    """Send every library's logs to a new file under ``data/logs/`` and warnings (everything with ``verbose``) to
    stderr; returns the file. Called once per process (a second call returns the first file)."""
    global _current
    if _current is not None:
        return _current
    verbose = verbose_requested(verbose)
    folder = Path(os.environ.get("DATAMART_LOG_DIR") or DATA_DIR / "logs")
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = folder / f"{command.replace(' ', '-')}-{stamp}-{os.getpid()}.log"
    _prune(folder)

    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setLevel(logging.INFO)
    file_handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.addHandler(_console(verbose))
    root.addHandler(file_handler)
    root.setLevel(logging.INFO)
    # dlt's logger does not propagate; dlt sets a formatter of its own on its first handler (the console one). Under
    # `dlt pipeline …` dlt has set it up already (its own stderr handler, config.toml's level): ours replace them.
    dlt_logger = logging.getLogger("dlt")
    consoles = [h for h in dlt_logger.handlers if type(h) is logging.StreamHandler]
    dlt_logger.handlers = [_console(verbose), file_handler] + [h for h in dlt_logger.handlers if h not in consoles]
    dlt_logger.addFilter(_ArrowHints())
    level = os.environ.setdefault("RUNTIME__LOG_LEVEL", "INFO")  # for dlt's later set-ups (a new pipeline)
    dlt_logger.setLevel(level)
    if sys.stderr.isatty() and sys.stdout.isatty():
        _terminal_progress_for_sqlmesh()
    _current = path
    return path


def _terminal_progress_for_sqlmesh() -> None:
    """SQLMesh's own progress bars (models built and audited, views promoted) on a terminal: its terminal console
    less what it prints to stay (the tree of differences before applying a plan, a line per model built, the unit
    tests' report when they pass, status lines): our summary says what was built, and the log file has the rest. A
    library user of SQLMesh gets its silent console otherwise, which cron, CI and Airflow keep. The methods are
    SQLMesh 0.236's (pinned in pyproject.toml)."""
    from sqlmesh.core.console import TerminalConsole, set_console

    class ProgressConsole(TerminalConsole):
        def plan(self, plan_builder: Any, auto_apply: bool, *args: Any, **kwargs: Any) -> None:
            if auto_apply:
                plan_builder.apply()

        def update_snapshot_evaluation_progress(
            self,
            snapshot: Any,
            interval: Any,
            batch_idx: int,
            duration_ms: int | None,
            num_audits_passed: int,
            num_audits_failed: int,
            audit_only: bool = False,
            execution_stats: Any = None,
            auto_restatement_triggers: Any = None,
        ) -> None:
            # no duration: the bars advance, no line stays for the model
            super().update_snapshot_evaluation_progress(
                snapshot,
                interval,
                batch_idx,
                None,
                num_audits_passed,
                num_audits_failed,
                audit_only,
                execution_stats,
                auto_restatement_triggers,
            )

        def log_test_results(self, result: Any, target_dialect: str) -> None:
            if not result.wasSuccessful():
                super().log_test_results(result, target_dialect)

        def log_status_update(self, message: str) -> None:
            pass

        def log_success(self, message: str) -> None:
            pass

    set_console(ProgressConsole())


def _console(verbose: bool) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.INFO if verbose else logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_Noise())
    return handler


def _prune(folder: Path) -> None:
    for old in sorted(folder.glob("*.log"), key=lambda p: p.stat().st_mtime, reverse=True)[KEEP - 1 :]:
        old.unlink(missing_ok=True)


def log_line() -> str:
    """The summary's last line: where the full logs are."""
    if _current is None:
        return ""
    try:
        shown = _current.relative_to(Path.cwd())
    except ValueError:
        shown = _current
    return f"Log: {shown} (dlt's and SQLMesh's own logs; -v or DATAMART_VERBOSE=1 shows them here)"


def progress_collector() -> tuple[type, dict[str, Any]]:
    """dlt's progress collector for a load, as its class and options: bars on a terminal (dlt's tqdm collector),
    otherwise periodic lines into the log file only (cron, CI and Airflow get our one line per step, not progress
    frames)."""
    import dlt

    if sys.stderr.isatty():
        return dlt.progress.tqdm, {"colour": "green"}
    return dlt.progress.log, {
        "log_period": PROGRESS_SECONDS,
        "logger": logging.getLogger("datamart.progress"),
        "dump_system_stats": False,
    }
