"""What ``dlt pipeline <name> run`` does: validate, run with retries on transient errors, print a summary."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, TextIO

from datamart.environments import check_environment
from datamart.errors import in_chain, is_transient, refused_credentials, root_cause
from datamart.ingest.declarations import DeclarationError, PipelineDecl, load_all, load_named
from datamart.ingest.dropped import TablesStopped
from datamart.ingest.evolution import RetypeRefused
from datamart.ingest.lock import PipelineLocked
from datamart.ingest.recopy import SlotLost
from datamart.ingest.runner import Carried, PipelineRun, TablesFailed, format_loads, make_pipeline, run_pipeline
from datamart.redact import redact
from datamart.settings import SettingsError, Warehouse, configure_environment, env_name, resolve_warehouse

ALL = "all"


def run_command(
    name: str | None,
    tables: list[str] | None = None,
    full_refresh: bool = False,
    target: str | None = None,
    dry_run: bool = False,
    attempts: int = 3,
    pipelines_dir: Path | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    wait: float = 0.0,
) -> int:
    """Run one declared pipeline (or ``all``); returns the exit code (0 ok, 1 run failed, 2 wrong input,
    3 another run of the pipeline holds its lock)."""
    configure_environment()
    try:
        if not name:
            raise DeclarationError("name the pipeline to run: dlt pipeline <name> run (or `all`)")
        declarations = load_all() if name == ALL else [load_named(name)]
        if tables and len(declarations) > 1:
            raise DeclarationError("--table selects tables of one pipeline: name the pipeline instead of `all`")
        for decl in declarations:
            for table in tables or []:
                decl.table(table)  # unknown table: stops here, before anything runs
        warehouse = resolve_warehouse(target)
        if dry_run:  # a run checks it under the pipeline's lock (runner.run_pipeline)
            check_environment(warehouse)  # prod credentials with DATAMART_ENV=dev (or the reverse) stop here
    except (DeclarationError, SettingsError) as exc:
        print(f"error: {exc}", file=err)
        return 2

    if dry_run:
        for decl in declarations:
            print(describe_plan(decl, warehouse, tables, full_refresh, pipelines_dir), file=out)
        return 0

    runs: list[PipelineRun] = []
    stopped = False
    for decl in declarations:
        try:
            runs.append(
                run_with_retries(
                    decl, warehouse, tables, full_refresh, attempts, pipelines_dir, out=out, err=err, wait=wait
                )
            )
        except TablesStopped as exc:  # the other tables were loaded: they are in the summary; exit 1 at the end
            print(failure_message(decl, exc), file=err)
            runs.append(exc.run)
            stopped = True
        except PipelineLocked as exc:
            print(f"error: {exc}", file=err)
            if runs:
                print(format_loads(runs), file=out)
            return 3
        except (DeclarationError, SettingsError) as exc:
            print(f"error: {redact(str(exc))}", file=err)
            return 2
        except Exception as exc:  # noqa: BLE001 - reported with what to do, then a non-zero exit
            print(failure_message(decl, exc), file=err)
            if isinstance(exc, TablesFailed) and exc.run is not None:
                runs.append(exc.run)  # what the other tables loaded
            if runs:
                print(format_loads(runs), file=out)
            partly_loaded = isinstance(exc, TablesFailed) and exc.run is not None
            # a setting error is exit 2 (nothing ran); once other tables loaded, the run itself failed: exit 1
            return 2 if is_config_error(exc) and not partly_loaded else 1
    print(format_loads(runs), file=out)
    return 1 if stopped else 0


def run_with_retries(
    decl: PipelineDecl,
    warehouse: Warehouse,
    tables: list[str] | None = None,
    full_refresh: bool = False,
    attempts: int = 3,
    pipelines_dir: Path | None = None,
    backoff: float = 2.0,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    wait: float = 0.0,
) -> PipelineRun:
    """Run a pipeline, retrying with exponential backoff when the failure is transient (connection, timeout).

    The run returned counts what every attempt loaded (an attempt may fail after its load: the next one reads
    nothing new, yet those rows were loaded by this command)."""
    carried = Carried()
    for attempt in range(1, attempts + 1):
        print(f"{decl.name}: extracting and loading {', '.join(tables or [t.name for t in decl.tables])}", file=out)
        try:
            return run_pipeline(
                decl, warehouse, tables, pipelines_dir, full_refresh=full_refresh, wait=wait, carried=carried
            )
        except Exception as exc:
            if attempt == attempts or not is_transient(exc):
                raise
            delay = backoff * 2 ** (attempt - 1)
            print(
                f"{decl.name}: transient error ({redact(root_cause(exc))}); "
                f"retry {attempt + 1}/{attempts} in {delay:.0f}s",
                file=err,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def failure_message(decl: PipelineDecl, exc: BaseException) -> str:
    """One paragraph: which pipeline, step and table failed, the root error, and what to run next."""
    from dlt.common.schema.exceptions import DataValidationError
    from dlt.extract.exceptions import PipeException
    from dlt.extract.incremental.exceptions import IncrementalCursorPathHasValueNone
    from sqlalchemy.exc import NoSuchTableError

    if isinstance(exc, TablesFailed):  # one paragraph per table that failed; the others loaded
        paragraphs = [failure_message(decl, error) for error in exc.errors.values()]
        if exc.run is not None:
            loaded = ", ".join(t.table for t in exc.run.tables)
            paragraphs.append(f"the other tables of '{decl.name}' were loaded ({loaded}); the run exits 1")
        return "\n".join(paragraphs)
    step = getattr(exc, "step", None)
    where = f" at step {step}" if step else ""
    contract = in_chain(exc, DataValidationError)
    pipe = in_chain(exc, PipeException)
    no_table = in_chain(exc, NoSuchTableError)
    missing = repr(str(no_table)) if no_table is not None else None
    table = getattr(contract, "table_name", None) or getattr(pipe, "pipe_name", None) or missing
    if table:
        where += f", table {table}"
    config = config_hint(decl, exc)
    stopped = in_chain(exc, TablesStopped)
    if isinstance(stopped, TablesStopped):
        return redact(f"error: {stopped}\nwhat to do: {stopped.hint}")
    lost = in_chain(exc, SlotLost)  # the replication slot invalidated or dropped during the run
    if isinstance(lost, SlotLost):
        return redact(f"error: {lost}\nwhat to do: {lost.hint}")
    retype = in_chain(exc, RetypeRefused)  # a source type change the warehouse's views cannot follow
    if isinstance(retype, RetypeRefused):
        return redact(f"error: pipeline '{decl.name}', table {retype.table}: {retype}\nwhat to do: {retype.hint}")
    if config is not None:
        hint = config
    elif is_transient(exc):
        hint = "the source or the warehouse could not be reached: check the connection, then rerun the same command"
    elif in_chain(exc, IncrementalCursorPathHasValueNone) is not None and table:
        cursor = decl.table(table).cursor if table in {t.name for t in decl.tables} else "cursor"
        hint = (
            f"rows of {table} have no {cursor} value, and a cursor must be set on every row: fill it in the source, "
            f"or declare another cursor for tables.{table} in {decl.path.name} (a column that is never null); "
            "nothing of that table was loaded"
        )
    elif missing is not None:
        hint = (
            f"the source has no table {missing}: correct the table's name under tables: in {decl.path.name} "
            "(names are matched exactly, as the source spells them), or set source.schema"
        )
    elif contract is not None and table:
        column = getattr(contract, "column_name", "")
        refresh = f"`dlt pipeline {decl.name} run --table {table} --full-refresh`"
        if decl.kind == "sql_database":
            evolve = (
                f"declare schema_contract: {{data_type: evolve}} on tables.{table} in {decl.path.name}: the new "
                f"values load into a variant column beside it ({column}__v_<type>), which works with SQLMesh's views "
                "in place; or "
            )
        else:  # files are read as arrow tables: no variant column, the export must keep its types
            evolve = "correct the export so that the column keeps its type; or "
        hint = (
            f"the source changed the type or size of {table}.{column}, which the warehouse table was created with: "
            f"{evolve}recreate the table with the new type, {refresh}, where no view reads it yet (DuckDB, or "
            "PostgreSQL before the first promotion: there SQLMesh's views keep the table, and its types, through a "
            "refresh); nothing of that table was loaded"
        )
    else:
        hint = (
            f"fix the cause (the source data, or the table's schema_contract in {decl.path.name}), then rerun "
            f"`dlt pipeline {decl.name} run`: each table of a load is applied whole or not at all, the next run "
            "finishes or discards what this one left and re-reads those rows from the source, and a row read again "
            "is never loaded twice (tables are matched on their primary key)"
        )
    return redact(f"error: pipeline '{decl.name}' failed{where}: {root_cause(exc)}\nwhat to do: {hint}")


def config_hint(decl: PipelineDecl, exc: BaseException) -> str | None:
    """What to set when the failure is a setting, not an outage (credentials a server refused, a secret dlt could not
    find): such a run is never retried. None for anything else."""
    from dlt.common.configuration.exceptions import ConfigFieldMissingException

    from datamart.settings import selected_environment, selected_target

    refused = refused_credentials(exc)
    if refused is not None:
        side, reason = refused
        if side == "source":
            key = f"sources.{decl.name}.credentials"
            where = f"{env_name(key)}=<SQLAlchemy URL> (or [sources.{decl.name}] credentials in .dlt/secrets.toml)"
        else:
            environment, target = selected_environment(), selected_target()
            prefix = "" if environment == "dev" else f"{environment}."
            key = f"{prefix}destination.{target}.credentials"
            where = f"{env_name(key)} (or [{prefix}destination.{target}] in .dlt/secrets.toml)"
        return (
            f"the {side} refused the connection ({reason}): set {where} to a user, password and database that "
            "exist there, then rerun the same command; a refused login is not retried"
        )
    missing = in_chain(exc, ConfigFieldMissingException)
    if missing is not None:
        fields = ", ".join(getattr(missing, "fields", []) or [])
        return (
            f"a setting is missing ({fields}): {missing}".splitlines()[0]
            + "; set it (environment variable or .dlt/secrets.toml), then rerun the same command"
        )
    return None


def is_config_error(exc: BaseException) -> bool:
    """A failure that only a setting or a declaration fixes: exit 2, like any other wrong input."""
    from dlt.common.configuration.exceptions import ConfigFieldMissingException
    from sqlalchemy.exc import NoSuchTableError

    return (
        refused_credentials(exc) is not None
        or in_chain(exc, (ConfigFieldMissingException, NoSuchTableError)) is not None
    )


def describe_plan(
    decl: PipelineDecl,
    warehouse: Warehouse,
    tables: list[str] | None,
    full_refresh: bool,
    pipelines_dir: Path | None = None,
) -> str:
    """What a run would do, per table, from the declaration and the incremental state kept in the warehouse."""
    pipeline = make_pipeline(decl, warehouse, pipelines_dir)
    pipeline.sync_destination()
    state = pipeline.state.get("sources", {}).get(decl.name, {}).get("resources", {})
    lines = [f"dry run: pipeline {decl.name} ({decl.kind}) → {warehouse.describe()}, dataset {decl.dataset}"]
    for table in decl.tables:
        if tables and table.name not in tables:
            continue
        last = _last_value(state, table.name, table.cursor)
        if full_refresh:
            read = "everything (full refresh: state reset, the table's rows replaced)"
        elif table.cursor:
            what = "files with" if decl.kind == "filesystem" else "rows with"
            read = f"{what} {table.cursor} after {last}" if last is not None else "everything (first run)"
        else:
            read = "everything"
        extras = []
        if table.deletes:
            extras.append("deletes " + ", ".join(f"{k}={v}" for k, v in table.deletes.items()))
        if table.personal:
            extras.append("personal " + ", ".join(f"{c}:{t}" for c, t in table.personal.items()))
        detail = f"; {'; '.join(extras)}" if extras else ""
        lines.append(f"  {table.name}: {table.write_disposition}, reads {read}{detail}")
    return "\n".join(lines)


def _last_value(state: dict[str, Any], table: str, cursor: str | None) -> Any:
    if not cursor:
        return None
    # a file table's cursor lives on its file listing resource (see sources._file_resource)
    resource = state.get(table) or state.get(f"filesystem_{table}") or {}
    incremental = resource.get("incremental", {})
    return incremental.get(cursor, {}).get("last_value")


def verify_command(
    name: str | None,
    tables: list[str] | None = None,
    target: str | None = None,
    full_compare: bool = False,
    chunk_size: int | None = None,
    wait: float = 0.0,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    repair: bool = False,
    pipelines_dir: Path | None = None,
) -> int:
    """Compare one declared pipeline (or ``all``) with its source; returns the exit code (0 no drift, 1 drift or
    failure, 2 wrong input, 3 a run of the pipeline holds its lock). ``repair``: reload the key ranges that differ,
    then compare again (0 when equal, 1 with the drift that remains)."""
    from datamart.ingest.repair import RepairError, repair_pipeline
    from datamart.ingest.verify import DEFAULT_CHUNK, verify_pipeline
    from datamart.ingest.verify import full_compare as run_full_compare

    configure_environment()
    try:
        if not name:
            raise DeclarationError("name the pipeline to verify: dlt pipeline <name> verify (or `all`)")
        declarations = load_all() if name == ALL else [load_named(name)]
        if tables and len(declarations) > 1:
            raise DeclarationError("--table selects tables of one pipeline: name the pipeline instead of `all`")
        for decl in declarations:
            for table in tables or []:
                decl.table(table)
        if full_compare and (len(declarations) != 1 or len(tables or []) != 1):
            raise DeclarationError(
                "--full-compare reloads one table: dlt pipeline <name> verify --full-compare --table <table>"
            )
        if full_compare and repair:
            raise DeclarationError("--repair and --full-compare are two commands: run one, then the other")
        warehouse = resolve_warehouse(target)
    except (DeclarationError, SettingsError) as exc:
        print(f"error: {redact(str(exc))}", file=err)
        return 2

    drift = False
    for decl in declarations:
        try:
            if full_compare:
                assert tables
                report = run_full_compare(decl, warehouse, tables[0], chunk_size or DEFAULT_CHUNK, wait=wait)
            elif repair:
                report = repair_pipeline(
                    decl, warehouse, tables, chunk_size or DEFAULT_CHUNK, wait=wait, pipelines_dir=pipelines_dir
                )
            else:
                report = verify_pipeline(decl, warehouse, tables, chunk_size or DEFAULT_CHUNK, wait=wait)
        except PipelineLocked as exc:
            print(f"error: {exc}", file=err)
            return 3
        except (DeclarationError, SettingsError) as exc:
            print(f"error: {redact(str(exc))}", file=err)
            return 2
        except Exception as exc:  # noqa: BLE001 - reported with what to do, then a non-zero exit
            if isinstance(exc, RepairError):
                print(f"error: {redact(str(exc))}", file=err)
                return 1
            command = f"dlt pipeline {decl.name} verify" + (" --repair" if repair else "")
            print(
                redact(
                    f"error: verify of pipeline '{decl.name}' failed: {root_cause(exc)}\nwhat to do: check that "
                    f"the source and the warehouse are reachable, then rerun `{command}`"
                ),
                file=err,
            )
            return 1
        print(report.format(), file=out)
        drift = drift or report.drift
    return 1 if drift else 0


def drop_replication_command(
    name: str | None,
    target: str | None = None,
    wait: float = 0.0,
    pipelines_dir: Path | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Remove a replication pipeline's slot and publication from its source and forget which tables were copied, so
    the next run starts with a fresh copy; idempotent. Returns the exit code (0 done or nothing left, 1 failure,
    2 wrong input or privileges the source user lacks (with the DBA's SQL), 3 a run of the pipeline holds its lock)."""
    import psycopg2

    from datamart.ingest.lock import pipeline_lock
    from datamart.ingest.replication import connect_source, forget_copies, is_replication, object_name
    from datamart.ingest.slots import drop_publication, drop_slot, format_size, max_retained_wal, measure
    from datamart.settings import quote_identifier

    configure_environment()
    try:
        if not name:
            raise DeclarationError("name the pipeline: dlt pipeline <name> drop-replication")
        decl = load_named(name)
        if not is_replication(decl):
            raise DeclarationError(
                f"{decl.path.name}: pipeline '{decl.name}' reads its source by cursor (no `changes: replication`): "
                "it has no slot nor publication to remove"
            )
        warehouse = resolve_warehouse(target)
    except (DeclarationError, SettingsError) as exc:
        print(f"error: {redact(str(exc))}", file=err)
        return 2

    slot, publication = object_name(decl, "slot"), object_name(decl, "publication")
    refused: list[str] = []  # the statements a DBA runs
    try:
        with pipeline_lock(warehouse, decl.name, wait=wait):  # no run reads the slot meanwhile
            check_environment(warehouse)  # the state to forget is in this warehouse: the selected environment's
            conn = connect_source(decl)
            try:
                status = measure(conn, slot, max_retained_wal(decl))
                try:
                    done = drop_slot(conn, slot)
                except psycopg2.errors.InsufficientPrivilege as exc:
                    refused.append(f"SELECT pg_drop_replication_slot('{slot}');")
                    done = f"NOT dropped ({str(exc).strip()})"
                if done == "dropped":
                    retained = f" (it retained {format_size(status.retained_wal_bytes)} of WAL)" if status else ""
                    print(f"{decl.name}: slot {slot!r} dropped{retained}", file=out)
                elif done == "absent":
                    print(f"{decl.name}: slot {slot!r} not on the source: nothing to drop", file=out)
                else:
                    print(f"{decl.name}: slot {slot!r} {done}", file=out)
                try:
                    dropped = drop_publication(conn, publication)
                except psycopg2.errors.InsufficientPrivilege as exc:
                    refused.append(f"DROP PUBLICATION {quote_identifier(publication)};")
                    dropped = f"NOT dropped ({str(exc).strip()})"
                suffix = " not on the source: nothing to drop" if dropped == "absent" else f" {dropped}"
                print(f"{decl.name}: publication {publication!r}{suffix}", file=out)
                user = None if not refused else str(_source_user(conn))
            finally:
                conn.close()
            if done in ("dropped", "absent"):  # the slot is gone: the next run creates one and copies again
                forgotten = forget_copies(decl, warehouse, pipelines_dir)
                what = "forgotten" if forgotten else "none recorded"
                print(
                    f"{decl.name}: which tables were copied: {what}; the next `dlt pipeline {decl.name} run` "
                    "creates the slot and the publication again and copies every table whole",
                    file=out,
                )
    except PipelineLocked as exc:
        print(f"error: {exc}", file=err)
        return 3
    except (DeclarationError, SettingsError) as exc:
        print(f"error: {redact(str(exc))}", file=err)
        return 2
    except Exception as exc:  # noqa: BLE001 - reported with what to do, then a non-zero exit
        print(
            redact(
                f"error: drop-replication of pipeline '{decl.name}' failed: {root_cause(exc)}\nwhat to do: fix the "
                f"cause, then rerun `dlt pipeline {decl.name} drop-replication` (what is already removed stays removed)"
            ),
            file=err,
        )
        return 1
    if refused:
        print(
            f"error: pipeline '{decl.name}': the source user {user!r} may not remove everything. A DBA (a superuser, "
            f"or the publication's owner) runs: {' '.join(refused)}  Then rerun `dlt pipeline {decl.name} "
            "drop-replication` (it removes what is left and forgets the copies).",
            file=err,
        )
        return 2
    return 0


def _source_user(conn: Any) -> Any:
    with conn.cursor() as cur:
        cur.execute("SELECT current_user")
        return cur.fetchone()[0]
