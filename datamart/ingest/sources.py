"""Turn a pipeline declaration into dlt resources built on dlt's own sources (sql_database, filesystem)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import dlt
from dlt.extract.resource import DltResource

from datamart.ingest.checks import (
    KeyCheck,
    PageLoopGuard,
    check_personal_columns,
    checked_file_reader,
    is_child_endpoint,
)
from datamart.ingest.declarations import SQL_BACKENDS, DeclarationError, PipelineDecl, TableDecl, closest
from datamart.ingest.deletes import (
    apply_delete_hints,
    deletion_marker,
    deletion_resource,
    gone_keys,
    record_deleted_rows,
)
from datamart.ingest.history import apply_history_hints
from datamart.ingest.personal import DROP, HASH, YEAR, personal_data_map, require_hmac_key, year_column
from datamart.ingest.rest import build_rest_resources
from datamart.settings import PROJECT_ROOT, SettingsError, Warehouse, env_name, secret


def source_credentials(pipeline: PipelineDecl, generating_demo: bool = False) -> str:
    """The SQLAlchemy URL of a sql_database pipeline, from ``sources.<name>.credentials``.

    ``generating_demo``: the URL the demo generator writes to (``make run``), so the demo's SQLite default may not
    exist yet.
    """
    key = f"sources.{pipeline.name}.credentials"
    setting = env_name(key)
    what_to_set = f"Set {setting}=<SQLAlchemy URL> or [sources.{pipeline.name}] credentials in .dlt/secrets.toml."
    url = secret(key)
    if not url:
        url = dlt.config.get(key)  # config.toml holds the demo's non-secret SQLite path
        if url:
            _check_demo_default(pipeline, str(url), what_to_set, must_exist=not generating_demo)
    if not url:
        raise SettingsError(f"pipeline '{pipeline.name}': no connection for its source. {what_to_set}")
    return normalise_sqlalchemy_url(str(url))


def _check_demo_default(pipeline: PipelineDecl, url: str, what_to_set: str, must_exist: bool = True) -> None:
    """The SQLite path of ``.dlt/config.toml`` is the demo's: it stands in for a missing secret only in development
    and once the demo database exists. Elsewhere a missing secret would read (or fail to open, and be retried as
    a lost connection) a file that has nothing to do with the source."""
    from datamart.settings import selected_environment

    if not url.startswith("sqlite:"):
        return
    environment = selected_environment()
    path = sqlite_path(normalise_sqlalchemy_url(url))
    if environment != "dev":
        reason = f"the demo's SQLite default in .dlt/config.toml ({url}) is not used with DATAMART_ENV={environment}"
    elif must_exist and path is not None and not path.exists():
        reason = (
            f"the demo's SQLite default in .dlt/config.toml ({url}) does not exist: generate the demo with "
            "`python -m datamart.demo` (or `make run`) to use it"
        )
    else:
        return
    raise SettingsError(f"pipeline '{pipeline.name}': no connection for its source ({reason}). {what_to_set}")


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL (None for an in-memory database)."""
    rest = url.split(":///", 1)[1] if ":///" in url else ""
    rest = rest.split("?", 1)[0]
    return Path(rest) if rest and rest != ":memory:" else None


def normalise_sqlalchemy_url(url: str) -> str:
    """Pin PostgreSQL URLs to psycopg2 and anchor relative SQLite paths at the project root."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix) :]
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        return f"sqlite:///{PROJECT_ROOT / url[len('sqlite:///') :]}"
    return url


def bucket_url(pipeline: PipelineDecl) -> str:
    """The bucket of a filesystem pipeline, from ``sources.<name>.bucket_url``; local paths are made absolute."""
    key = f"sources.{pipeline.name}.bucket_url"
    url = dlt.config.get(key)
    if not url:
        raise SettingsError(
            f"pipeline '{pipeline.name}': no bucket. Set {key.upper().replace('.', '__')}=s3://... "
            f"or [sources.{pipeline.name}] bucket_url in .dlt/config.toml."
        )
    url = str(url)
    if "://" not in url and not os.path.isabs(url):
        url = str(PROJECT_ROOT / url)
    return url


# Arrow-based extraction (SQL tables, files) cannot turn a type change into a variant column: dlt would fail at load
# time and leave a package that blocks every later run. Stop at extract with a clear message instead, unless the table
# declares `schema_contract: {data_type: evolve}`. REST rows are dicts: dlt's default (evolve) makes variants there.
# A SQL table's type change is found before extract and applied by reloading the table (evolution.py): the frozen
# contract then only stops what that comparison cannot see (a file's column type).
# Rows per extracted chunk (source.chunk_size overrides it): the unit of memory of a load, whatever the table's size.
CHUNK_SIZE = 100_000

DEFAULT_CONTRACTS: dict[str, dict[str, str]] = {
    "sql_database": {"data_type": "freeze"},
    "filesystem": {"data_type": "freeze"},
}


def build_resources(
    pipeline: PipelineDecl,
    tables: list[str] | None = None,
    known_columns: dict[str, list[str]] | None = None,
    held_back: dict[str, list[str]] | None = None,
    notes: list[str] | None = None,
    restrict: dict[str, Any] | None = None,
) -> list[DltResource]:
    """One dlt resource per declared table (or only ``tables``), with write disposition, key, cursor and PII map.

    ``restrict`` (SQL tables; ``verify --repair``): per table, a function of the source table returning the
    SQLAlchemy condition of the rows to read; those tables are read without their cursor (dlt's incremental state
    is neither read nor written), with the same SELECT and personal-data treatment as any run.

    In a SQL table with personal columns, a source column that is neither in ``known_columns`` (what the warehouse
    already has) nor classified under ``personal:`` is held back, and listed in ``held_back``: an unclassified column
    of a table holding personal data may itself be personal. ``notes`` receives what the run summary should say
    (a table read with another backend than the pipeline's).
    """
    selected = _selected(pipeline, tables)
    known_columns = known_columns if known_columns is not None else {}
    held_back = held_back if held_back is not None else {}
    check_secrets(pipeline, tables)
    if pipeline.kind == "rest_api":
        built = build_rest_resources(pipeline, selected, pipeline.raw_tables)
    elif pipeline.kind == "filesystem":
        built = [_file_resource(pipeline, t) for t in selected]
    else:
        backends = table_backends(pipeline, selected, notes if notes is not None else [])
        built = [
            _sql_resource(
                pipeline,
                t,
                known_columns.get(t.name, []),
                held_back.setdefault(t.name, []),
                backends[t.name],
                (restrict or {}).get(t.name),
            )
            for t in selected
        ]
        for table, resource in zip(selected, built, strict=True):
            check_columns_exist(pipeline, table, resource)
        unique = _unique_in_source(pipeline, [t for t in selected if t.write_disposition == "merge"])
        for table, resource in zip(selected, built, strict=True):
            if table.name in unique:
                # One extract is one query: a key the source keeps unique arrives once, so dlt's staging dedup (a
                # ROW_NUMBER() window over every column of the staged rows) has nothing to remove. Skipping it took
                # the DuckDB full load of `make bench` from 1.3-1.4 GB to 0.82 GB at the same speed.
                resource.apply_hints(
                    write_disposition={"disposition": "merge", "strategy": "delete-insert", "deduplicated": True}
                )
    resources = []
    for table, resource in zip(selected, built, strict=True):
        if table.write_disposition == "append" and table.primary_key:
            keep_loaded_rows(resource)
        if table.personal:
            resource.add_map(personal_data_map(pipeline.name, table.name, table.personal))
            _rewrite_column_hints(resource, table.personal)
        relax_not_null(resource, table)
        if table.primary_key:
            resource.add_step(KeyCheck(pipeline, table, table.primary_key))  # a null or duplicated key stops here
        if pipeline.kind == "rest_api" and not is_child_endpoint(pipeline.raw_tables.get(table.name)):
            resource.add_step(PageLoopGuard(pipeline, table))  # an API serving the same page again stops here
        if table.deletes:
            apply_delete_hints(resource, table)
        if table.history:
            marker = deletion_marker(resource, table) if table.deletes else None
            apply_history_hints(resource, table, marker)
        if pipeline.kind == "sql_database":
            # connectorx yields an empty record batch when nothing changed; dlt would write an empty parquet file
            # that the ADBC loader refuses ("Must pass schema, or at least one RecordBatch")
            resource.add_filter(_not_empty)
        contract = {**DEFAULT_CONTRACTS.get(pipeline.kind, {}), **table.schema_contract}
        if contract:
            resource.apply_hints(schema_contract=contract)
        resources.append(resource)
    return resources


def keep_loaded_rows(resource: DltResource) -> None:
    """Load an append table with dlt's ``insert-only`` merge: a row whose key the table already holds is skipped.

    A plain append copies each file of a load straight into the table, committed job by job: when another job of
    the same package fails (a row a constraint refuses), or the run is killed, or the working directory holding
    the pending package is lost (a fresh worker), the next run re-reads those rows from the state of the last
    completed load and would append them a second time. ``insert-only`` stages the rows and inserts, in one
    transaction (one MERGE), only the keys the table does not hold yet: a table is applied whole or not at all,
    and re-reading rows is harmless whatever happened to the working directory. Rows are never updated, as an
    append table promises.
    """
    resource.apply_hints(write_disposition={"disposition": "merge", "strategy": "insert-only"})


def _unique_in_source(pipeline: PipelineDecl, tables: list[TableDecl]) -> set[str]:
    """The tables whose declared primary key the source enforces (its primary key, or a unique constraint or index
    on exactly those columns). A key the source does not enforce may repeat: dlt then keeps one row per key."""
    import sqlalchemy as sa

    if not tables:
        return set()
    engine = sa.create_engine(source_credentials(pipeline))
    schema = pipeline.options.get("schema")
    unique = set()
    try:
        inspector = sa.inspect(engine)
        for table in tables:
            wanted = set(table.primary_key)
            keys = [inspector.get_pk_constraint(table.name, schema=schema).get("constrained_columns") or []]
            keys += [c["column_names"] for c in inspector.get_unique_constraints(table.name, schema=schema)]
            keys += [i["column_names"] for i in inspector.get_indexes(table.name, schema=schema) if i.get("unique")]
            if wanted and any(set(k) == wanted for k in keys):
                unique.add(table.name)
    finally:
        engine.dispose()
    return unique


def _not_empty(item: Any) -> bool:
    """False for an arrow table (or record batch) without rows; True for anything else."""
    return getattr(item, "num_rows", 1) > 0


def check_columns_exist(pipeline: PipelineDecl, table: TableDecl, resource: DltResource) -> None:
    """Stop before anything is loaded when a declared cursor, key or soft-delete column is not in the source table."""
    columns = resource.columns if isinstance(resource.columns, dict) else {}
    if not columns:
        return  # minimal reflection (variant mode): the source is checked by the query itself
    available = set(columns) | {year_column(c) for c, t in table.personal.items() if t == YEAR}
    checked = (
        ("cursor", [table.cursor] if table.cursor else []),
        ("primary_key", list(table.primary_key)),
        ("deletes.soft", [table.deletes["soft"]] if table.deletes.get("soft") else []),
    )
    for key, names in checked:
        missing = [n for n in names if n not in available]
        if missing:
            raise DeclarationError(
                f"{pipeline.path.name}: tables.{table.name}.{key}: column {missing[0]!r} does not exist in the "
                f"source table {table.name}; its columns: {', '.join(sorted(columns))}"
            )


def check_secrets(pipeline: PipelineDecl, tables: list[str] | None = None) -> None:
    """Stop before anything is read or written when a secret the declaration needs is missing."""
    if any(HASH in t.personal.values() for t in _selected(pipeline, tables)):
        require_hmac_key(pipeline.name)
    if pipeline.kind == "sql_database":
        source_credentials(pipeline)


def build_deletions(
    pipeline: PipelineDecl,
    resources: list[DltResource],
    warehouse: Warehouse,
    counter: dict[str, int],
    tables: list[str] | None = None,
    skip: set[str] | frozenset[str] = frozenset(),
    sizes: dict[str, int] | None = None,
) -> list[DltResource]:
    """For tables declaring ``deletes: {hard: key_set}`` with keys gone from the source: their deletion rows.

    The number of keys found is written into ``counter`` per table; tables with none get no resource (no load).
    Tables in ``skip`` are not compared (the runner passes those that were empty before this run: everything in
    them was just read from the source; a key deleted since is found by the next run). ``sizes``: the tables' row
    counts in the warehouse, when known (they set the comparison's bucket width).
    """
    from concurrent.futures import ThreadPoolExecutor

    by_name = {r.name: r for r in resources}
    compared = [t for t in _selected(pipeline, tables) if t.deletes.get("hard") == "key_set" and t.name not in skip]
    if not compared:
        return []
    url = source_credentials(pipeline)
    # PostgreSQL warehouses: the tables side by side (the time is spent in the two servers and in connectorx, outside
    # the GIL). A DuckDB file is read by one connection at a time.
    workers = min(4, len(compared)) if warehouse.is_server else 1
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        found = list(pool.map(lambda t: gone_keys(pipeline, t, url, warehouse, (sizes or {}).get(t.name)), compared))
    deletions = []
    for table, gone in zip(compared, found, strict=True):
        counter[table.name] = gone.num_rows
        if gone.num_rows:
            record_deleted_rows(pipeline, table, gone, warehouse)  # for incremental marts
            deletions.append(deletion_resource(table, gone, deletion_marker(by_name[table.name], table)))
    return deletions


def relax_not_null(resource: DltResource, table: TableDecl) -> None:
    """Raw tables accept nulls outside the primary key: deletion rows and variant columns need it, and a NOT NULL
    copied from the source would turn a source-side change into a failed load. Key columns are never null,
    whatever the source's reflection says (SQLite reports its INTEGER PRIMARY KEY nullable), so every resource
    writing the table agrees and a frozen data_type contract sees no change."""
    columns = resource.columns
    if isinstance(columns, dict):
        for name, hint in columns.items():
            hint["nullable"] = name not in table.primary_key


def _selected(pipeline: PipelineDecl, tables: list[str] | None) -> list[TableDecl]:
    return [pipeline.table(t) for t in tables] if tables else list(pipeline.tables)


def _rewrite_column_hints(resource: DltResource, policy: dict[str, str]) -> None:
    """Make the reflected column hints describe the treated data: no dropped or coarsened source column."""
    columns = resource.columns
    if not isinstance(columns, dict):
        return
    for column, treatment in policy.items():
        columns.pop(column, None)  # a coarsened column (birth_date -> birth_year) is typed from its data
        if treatment == HASH:
            columns[column] = {"name": column, "data_type": "text", "nullable": True}


def _sql_resource(
    pipeline: PipelineDecl,
    table: TableDecl,
    known: list[str] | None = None,
    held_back: list[str] | None = None,
    backend: str | None = None,
    restrict: Any = None,
) -> DltResource:
    from dlt.sources.sql_database import sql_table

    # Every table with personal columns goes through the adapter: it checks that each declared personal column
    # exists (a misspelt one would otherwise load the real column in clear) and builds the SELECT without them.
    adapter = (
        _select_adapter(pipeline, table, known or [], held_back if held_back is not None else [])
        if table.personal
        else None
    )
    # A type change evolves into a variant column (places__v_text) only row by row: dlt's arrow path cannot.
    variants = table.schema_contract.get("data_type") == "evolve"
    credentials = source_credentials(pipeline)
    chunk_size = int(pipeline.options.get("chunk_size", CHUNK_SIZE))
    backend = "sqlalchemy" if variants else backend or sql_backend(pipeline, credentials)
    resource = sql_table(
        credentials=credentials,
        table=table.name,
        schema=pipeline.options.get("schema"),
        backend=backend,
        # connectorx streams record batches of chunk_size rows: memory stays flat whatever the table's size
        backend_kwargs={"return_type": "arrow_stream", "batch_size": chunk_size} if backend == "connectorx" else None,
        reflection_level="minimal" if variants else "full",
        chunk_size=chunk_size,
        incremental=_incremental(table) if restrict is None else None,
        table_adapter_callback=adapter,
        # the adapted table: a subquery when personal columns are treated, so the condition sees treated columns
        query_adapter_callback=(lambda query, source: query.where(restrict(source))) if restrict else None,
        write_disposition=table.write_disposition,
        primary_key=list(table.primary_key) or None,
    )
    # tables are extracted side by side in dlt's thread pool (connectorx reads outside the GIL)
    return resource.parallelize()


def sql_backend(pipeline: PipelineDecl, url: str) -> str:
    """The table backend of a SQL pipeline: ``source.backend`` in its declaration, else connectorx for PostgreSQL
    sources (measured: extract ≈ 2× faster than pyarrow, in bounded memory) and pyarrow for the others."""
    declared = pipeline.options.get("backend")
    if declared:
        if declared not in SQL_BACKENDS:
            raise DeclarationError(
                f"{pipeline.path.name}: source.backend: {declared!r} is not one of {', '.join(SQL_BACKENDS)}"
            )
        return str(declared)
    if url.startswith(("postgresql", "postgres:")):
        try:
            import connectorx  # noqa: F401
        except ImportError:
            return "pyarrow"
        return "connectorx"
    return "pyarrow"


# PostgreSQL types connectorx 0.4 reads (measured on PostgreSQL 15, every other type tried panics with "not
# implemented": tsvector, tsquery, xml, money, interval, cidr, macaddr, point, box, varbit, timetz, composite types,
# pg_lsn, xid, and arrays of timestamps, enums or uuids). Enums and domains over these read as their base type.
CONNECTORX_TYPES = frozenset(
    "bool int2 int4 int8 float4 float8 numeric text varchar bpchar char name date time timestamp timestamptz uuid "
    "json jsonb bytea inet int4range int8range numrange tsrange tstzrange daterange bit oid".split()
)
CONNECTORX_ARRAY_ELEMENTS = frozenset("bool int2 int4 int8 float4 float8 numeric text varchar bpchar".split())


def table_backends(pipeline: PipelineDecl, tables: list[TableDecl], notes: list[str]) -> dict[str, str | None]:
    """The backend of each table: its declared ``backend``, else the pipeline's, except that a table with a column
    connectorx cannot read (it would stop the whole pipeline with a panic) is read with pyarrow, said in ``notes``.

    ``None`` leaves the choice to :func:`sql_backend` (one lookup of the pipeline's default).
    """
    chosen: dict[str, str | None] = {t.name: t.backend for t in tables}
    undecided = [t for t in tables if not t.backend]
    if not undecided:
        return chosen
    url = source_credentials(pipeline)
    default = sql_backend(pipeline, url)
    if default != "connectorx":
        return chosen
    unreadable = _connectorx_unreadable(url, pipeline.options.get("schema"), [t.name for t in undecided])
    for table in undecided:
        columns = unreadable.get(table.name)
        if columns:
            chosen[table.name] = "pyarrow"
            shown = ", ".join(f"{name} ({sql_type})" for name, sql_type in columns[:3])
            notes.append(
                f"table {table.name} read with pyarrow: connectorx cannot read {shown}"
                + (f" and {len(columns) - 3} more" if len(columns) > 3 else "")
                + f" (set backend: on the table in pipelines/{pipeline.name}.yaml to choose)"
            )
        else:
            chosen[table.name] = default
    return chosen


def _connectorx_unreadable(url: str, schema: str | None, tables: list[str]) -> dict[str, list[tuple[str, str]]]:
    """Per table, the columns (name, type) whose PostgreSQL type connectorx cannot read: one catalog query."""
    import sqlalchemy as sa

    statement = sa.text(
        """
        SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod),
               CASE WHEN t.typtype = 'd' THEN bt.typname ELSE t.typname END,
               CASE WHEN t.typtype = 'd' THEN bt.typtype ELSE t.typtype END,
               et.typname
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_type t ON t.oid = a.atttypid
        LEFT JOIN pg_type bt ON bt.oid = t.typbasetype
        LEFT JOIN pg_type et ON et.oid = (CASE WHEN t.typtype = 'd' THEN bt.typelem ELSE t.typelem END)
             AND (CASE WHEN t.typtype = 'd' THEN bt.typcategory ELSE t.typcategory END) = 'A'
        WHERE n.nspname = COALESCE(:schema, current_schema()) AND c.relname = ANY(:tables)
          AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY c.relname, a.attnum
        """
    )
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(statement, {"schema": schema, "tables": tables}).fetchall()
    finally:
        engine.dispose()
    unreadable: dict[str, list[tuple[str, str]]] = {}
    for table, column, sql_type, base, kind, element in rows:
        if element is not None:
            readable = element in CONNECTORX_ARRAY_ELEMENTS
        else:
            readable = kind == "e" or base in CONNECTORX_TYPES
        if not readable:
            unreadable.setdefault(table, []).append((column, sql_type))
    return unreadable


def _select_adapter(pipeline: PipelineDecl, table: TableDecl, known: list[str], held_back: list[str]) -> Any:
    """A table adapter (dlt calls it with the reflected source table, before any row is read) that refuses a
    declared personal column the source table lacks, and SELECTs without the dropped columns, with the year of each
    coarsened date instead of the date (the date never leaves the source), and without the unclassified new columns
    of a table with personal data (listed in ``held_back``)."""
    import sqlalchemy as sa

    dropped = {c for c, treatment in table.personal.items() if treatment == DROP}
    coarsened = [c for c, treatment in table.personal.items() if treatment == YEAR]

    def adapt(source: sa.Table) -> Any:
        names = [column.name for column in source.columns]
        for declared in table.personal:
            if declared not in names:
                raise DeclarationError(
                    f"{pipeline.path.name}: tables.{table.name}.personal.{declared}: the source table {table.name} "
                    f"has no column {declared!r}{closest(declared, names)}; its columns: {', '.join(names)}. "
                    "Nothing was read: correct the name (as the source spells it), or remove the entry if the "
                    "column is gone. A misspelt personal column would load the real one in clear."
                )
        selected = []
        for column in source.columns:
            if column.name in dropped or column.name in coarsened:
                continue
            if known and column.name not in known and column.name not in table.personal:
                held_back.append(column.name)
                continue
            selected.append(column)
        years = [sa.cast(sa.extract("year", source.c[c]), sa.BigInteger).label(year_column(c)) for c in coarsened]
        return sa.select(*selected, *years).subquery(source.name)

    return adapt


def _incremental(table: TableDecl) -> dlt.sources.incremental[Any] | None:
    if not table.cursor:
        return None
    cursor = cursor_path(table.cursor)
    if table.write_disposition == "merge":
        # Rows sharing the last cursor value are re-read (closed range) and de-duplicated by primary key in the
        # state, so a run with no source change loads nothing.
        return dlt.sources.incremental(cursor, lag=table.lag)
    # Append tables with a strictly growing cursor (ids): start strictly after the last value seen.
    return dlt.sources.incremental(cursor, range_start="open")


def cursor_path(column: str) -> str:
    """dlt's cursor path of a column: the name itself, or quoted when it is not a plain identifier (``Updated At``
    would be read as a JSONPath expression)."""
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", column):
        return column
    return '"' + column.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _file_resource(pipeline: PipelineDecl, table: TableDecl) -> DltResource:
    from dlt.sources.filesystem import filesystem

    url = bucket_url(pipeline)
    listing = {"bucket_url": url, "file_glob": str(table.files), **_fs_credentials(pipeline, url)}
    check_personal_columns(pipeline, table, filesystem(**listing))  # a misspelt personal column: refused here
    files = filesystem(**listing)
    if table.cursor:
        files.apply_hints(incremental=dlt.sources.incremental(table.cursor))
    # one file at a time, in record batches of chunk_size rows (readers.py): memory stays flat whatever the file's
    # size; a file that cannot be read is named in the error (see checks.py)
    chunk_size = int(pipeline.options.get("chunk_size", CHUNK_SIZE))
    resource = (files | checked_file_reader(pipeline, table, chunk_size)).with_name(table.name)
    resource.apply_hints(
        write_disposition=table.write_disposition,
        primary_key=list(table.primary_key) or None,
    )
    if table.format in ("csv", "parquet"):
        # dlt's dict readers gave every row a random _dlt_id (NOT NULL in the tables they created), Arrow batches
        # get none: add it, so that tables loaded before keep loading and every file table keeps the same columns
        resource.add_map(_with_row_ids)
    return resource


def _with_row_ids(batch: Any) -> Any:
    """The batch with dlt's random ``_dlt_id`` row ids, as dlt gives dict rows."""
    import pyarrow as pa
    from dlt.common.normalizers.utils import generate_dlt_ids

    if not isinstance(batch, pa.Table | pa.RecordBatch) or "_dlt_id" in batch.schema.names:
        return batch
    table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
    return table.append_column("_dlt_id", pa.array(generate_dlt_ids(table.num_rows), type=pa.string()))


def _fs_credentials(pipeline: PipelineDecl, url: str) -> dict[str, Any]:
    if url.startswith("file://") or "://" not in url or Path(url).exists():
        return {}
    key = f"sources.{pipeline.name}.credentials"
    credentials = secret(key)
    if credentials is None:
        raise SettingsError(
            f"pipeline '{pipeline.name}': the bucket {url} needs credentials: set {env_name(key)} or "
            f"[sources.{pipeline.name}.credentials] in .dlt/secrets.toml (see .dlt/example.secrets.toml)."
        )
    return {"credentials": credentials}
