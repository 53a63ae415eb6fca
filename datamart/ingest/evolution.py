"""Source schema changes applied in the run that finds them: a column added to a SQL source table, or a column whose
type changed, makes that table reload whole (its other tables load as usual) instead of reaching the warehouse late
or stopping the table.

Why a reload: a cursor reads only rows whose cursor moved. ``ALTER TABLE … ADD COLUMN … DEFAULT`` rewrites no row,
so an added column would reach only rows that change afterwards (the others keep NULL), and a column added while
no row changes would never appear. A type change cannot be merged into a column of the old type (dlt's arrow path
cannot make a variant column). Both are found before anything is read, by comparing the columns the source
reflects (with the types dlt derives from them) with dlt's schema of the warehouse table; the table is then
replaced through the staging dataset in one transaction (see :func:`datamart.ingest.runner.replace_through_staging`),
so readers see the old rows or the new ones, and SQLMesh's views over the table stay.

A retyped column is first migrated in the warehouse (``ALTER COLUMN … TYPE … USING CAST``), its dlt schema column
updated, then the table reloaded. On PostgreSQL a column read by a view cannot change type: the views reading the
table (SQLMesh's staging views and the views over them) are dropped and created again from their own definitions,
with their grants, owner and comment, in the same transaction as the ``ALTER`` — never missing for a reader.

Where the warehouse has no cast from the old type to the new one (PostgreSQL: boolean ↔ bigint; either engine: text
holding values that are not numbers becoming a number, …), the table is rebuilt instead (:func:`_rebuild`): the
source's rows are loaded whole, with the new type, into a scratch dataset ``<dataset>_rebuild`` by dlt, then one
transaction empties the column (``USING NULL``: no cast needed), replaces the table's rows with the scratch copy and
creates the views again; the reload that follows every retype then runs as usual. Why this loses nothing whatever
fails between the steps: until that transaction commits the table is untouched and dlt's schema still has the old
type, so the next run finds the same change and starts again; once it commits, the table holds the source's rows in
the new type, and the next run finds either the change again (dlt's schema not saved yet: the cast is then from the
new type to itself) or a reset incremental state (the reload's), which reads the table whole. A history table
(``history: scd2``) is never rebuilt (its past versions exist nowhere else): its values are converted through
``integer`` or ``text`` where the warehouse can, else nothing changes and the message says so.

A view that cannot be created over the new type (a model computing on the old one) is named in the message; nothing
changes then, and the table is not loaded until that model changes.

Not handled here: a column dropped from the source (stops the table, see ``dropped.py``); file tables (a new column
in a file arrives with that file's rows; earlier files did not have it); a new unclassified column of a table with
personal data, held back as before (see ``sources._select_adapter``); variant mode
(``schema_contract: {data_type: evolve}``, minimal reflection: no types to compare).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from datamart.ingest.declarations import PipelineDecl, warehouse_name

INTERNAL_PREFIXES = ("_dlt", "_datamart")


@dataclass
class SchemaChange:
    """What changed in one source table since its last load."""

    table: str
    added: list[str] = field(default_factory=list)
    retyped: list[tuple[str, str, str]] = field(default_factory=list)  # column, type before, type now (SQL)

    def describe(self, rows: int, seconds: float) -> str:
        """One line of the run summary: what changed, and what it cost."""
        parts = []
        if self.added:
            parts.append(f"column{'s' if len(self.added) > 1 else ''} {', '.join(self.added)} added")
        parts += [f"column {column} retyped {old} → {new}" for column, old, new in self.retyped]
        return f"{', '.join(parts)}, table reloaded ({rows:,} rows, {seconds:.1f} s)"


class RetypeRefused(RuntimeError):
    """A retype of ``table`` that changed nothing: a view cannot be created over the new type (``view``, named), or a
    history table's values have no conversion; ``hint``: what to do (set by the runner, which knows the pipeline)."""

    def __init__(self, message: str, table: str = "", hint: str = "", view: str = "") -> None:
        super().__init__(message)
        self.table = table
        self.hint = hint
        self.view = view


class _CastRefused(RuntimeError):
    """The warehouse has no cast for the values of ``column`` to ``sql_type`` (the table is rebuilt instead)."""

    def __init__(self, column: str, sql_type: str, error: BaseException) -> None:
        super().__init__(f"cannot cast {column} to {sql_type} ({_first_line(error)})")
        self.column, self.sql_type = column, sql_type


REBUILD_SUFFIX = "_rebuild"  # one underscore: dlt normalises "__" in dataset names
#: Injected failure for tests: set to ``after-swap`` to stop once the rebuilt rows are in, before dlt's schema is saved.
FAIL_ENV = "DATAMART_TEST_REBUILD_FAIL"


def source_changes(
    decl: PipelineDecl, resources: list[Any], known: dict[str, list[str]], schema: Any
) -> dict[str, SchemaChange]:
    """Per SQL table already loaded, the columns its source added and those whose type changed.

    ``resources``: the tables' dlt resources, built (their column hints are the source's reflection, after the
    personal-data adapter: a held-back or dropped column is not there); ``known``: the data columns dlt's schema
    has per table; ``schema``: dlt's schema (the warehouse's types), or None before the first load.
    """
    if decl.kind != "sql_database" or schema is None:
        return {}
    changes: dict[str, SchemaChange] = {}
    for resource in resources:
        table = decl.table(resource.name)
        if table.schema_contract.get("data_type") == "evolve" or not known.get(table.name):
            continue  # variant mode (no reflected types), or never loaded: built from what the source has now
        hints = resource.columns if isinstance(resource.columns, dict) else {}
        loaded = schema.tables.get(warehouse_name(table.name), {}).get("columns", {})
        change = SchemaChange(table.name)
        for name, hint in hints.items():
            column = warehouse_name(name)
            if column.startswith(INTERNAL_PREFIXES):
                continue
            if column not in loaded:
                # a column dlt types from its values (no reflected type: tsvector, a domain) is created only once a
                # value arrives: one that holds no value yet would be "added" again at every run
                if hint.get("data_type") or _holds_a_value(decl, table.name, name):
                    change.added.append(column)
                continue
            new_type, old_type = hint.get("data_type"), loaded[column].get("data_type")
            if new_type and old_type and (new_type != old_type or _size(hint) != _size(loaded[column])):
                change.retyped.append((column, old_type, new_type))
        if change.added or change.retyped:
            changes[table.name] = change
    return changes


def _holds_a_value(decl: PipelineDecl, table: str, column: str) -> bool:
    """True when some row of the source table has a value in ``column``."""
    import sqlalchemy as sa

    from datamart.ingest.sources import source_credentials

    engine = sa.create_engine(source_credentials(decl))
    try:
        source = sa.table(table, sa.column(column), schema=decl.options.get("schema"))
        statement = sa.select(sa.literal(1)).select_from(source).where(source.c[column].is_not(None)).limit(1)
        with engine.connect() as conn:
            return conn.execute(statement).first() is not None
    finally:
        engine.dispose()


def _size(column: dict[str, Any]) -> tuple[Any, Any]:
    """A decimal column's precision and scale (a numeric(6,2) becoming numeric(20,2) would refuse the larger values);
    other types' sizes are not compared (text loads unbounded, integers as bigint)."""
    if column.get("data_type") != "decimal":
        return (None, None)
    return (column.get("precision"), column.get("scale"))


def retype_columns(
    pipeline: Any,
    table: str,
    change: SchemaChange,
    resource: Any,
    rebuild: Any = None,
    history: bool = False,
) -> None:
    """Migrate the retyped columns of ``table`` in the warehouse (and its staging copy), then in dlt's schema.

    Where the warehouse has no cast, the table is rebuilt from the source (see the module's docstring): ``rebuild``
    loads the source's rows of the table, with the new types, into a dataset it is given (a callable taking the
    scratch pipeline). ``change.retyped`` is rewritten with the warehouse's SQL types (for the summary). Raises
    :class:`RetypeRefused` when a view cannot be created over the new type, or a ``history`` table has no
    conversion; nothing is changed then.
    """
    schema = pipeline.default_schema
    name = warehouse_name(table)
    columns = schema.tables[name]["columns"]
    updated = {}
    for column, _old, new in change.retyped:
        hint = dict(resource.columns[column]) if column in resource.columns else {"data_type": new}
        updated[column] = {**columns[column], "data_type": new}
        for key in ("precision", "scale", "timezone"):
            updated[column].pop(key, None)
            if key in hint:
                updated[column][key] = hint[key]
    postgres = pipeline.destination.destination_name == "postgres"
    with pipeline.destination_client() as job:
        prepared = {**schema.tables[name], "columns": {**columns, **updated}}
        sql_types = {c: job.type_mapper.to_destination_type(updated[c], prepared) for c in updated}
        before = {c: job.type_mapper.to_destination_type(columns[c], prepared) for c in updated}
        conversions = ["CAST({column} AS {type})"]
        if history:  # never rebuilt: its past versions exist nowhere else (boolean <-> integer goes through integer)
            conversions += ["CAST(CAST({column} AS INTEGER) AS {type})", "CAST(CAST({column} AS TEXT) AS {type})"]
        refused: _CastRefused | None = None
        for conversion in conversions:
            try:
                with job.sql_client.begin_transaction():
                    _alter(job.sql_client, name, sql_types, postgres, conversion)
                refused = None
                break
            except _CastRefused as exc:
                refused = exc
    if refused is not None:
        if history or rebuild is None:
            raise RetypeRefused(
                f"the warehouse has no conversion of {refused.column} to {refused.sql_type} "
                f"({str(refused.__cause__ or refused).strip().splitlines()[0]}), and a history table keeps its past "
                "versions, which exist nowhere else: it is not rebuilt from the source"
            ) from refused
        _rebuild(pipeline, name, sql_types, rebuild, postgres)
    # taken again: opening the destination client may reload the live schema from storage (new dicts)
    schema = pipeline.default_schema
    schema.tables[name]["columns"].update(updated)
    schema._bump_version()
    pipeline.schemas.save_schema(schema)
    change.retyped = [(c, before[c], sql_types[c]) for c in updated]


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _table_exists(client: Any, name: str) -> bool:
    from dlt.destinations.exceptions import DatabaseUndefinedRelation

    try:
        client.execute_sql(f"SELECT 1 FROM {client.make_qualified_table_name(name)} WHERE 1 = 0")
    except DatabaseUndefinedRelation:
        return False
    return True


def _alter(client: Any, name: str, sql_types: dict[str, str], postgres: bool, conversion: str) -> None:
    """ALTER the columns' types, converting the values held with ``conversion`` (``{column}``, ``{type}``); dlt's
    staging copy of the table is emptied instead (its rows are the last load's, never read again: the next load
    truncates it). On PostgreSQL, the views reading the table are created again around it. The caller's
    transaction; raises :class:`_CastRefused` when a value has no conversion, :class:`RetypeRefused` naming the view
    that cannot be created over the new type."""
    qualified = client.make_qualified_table_name(name)
    views = _dependent_views(client, qualified) if postgres else []
    _drop_views(client, views)
    for column, sql_type in sql_types.items():
        escaped = client.escape_column_name(column)
        using = conversion.replace("{column}", escaped).replace("{type}", sql_type)  # a name may hold braces
        try:
            client.execute_sql(f"ALTER TABLE {qualified} ALTER COLUMN {escaped} TYPE {sql_type} USING {using}")
        except Exception as exc:
            raise _CastRefused(column, sql_type, exc) from exc
    _empty_staging_columns(client, name, sql_types)
    _create_views(client, views)


def _empty_staging_columns(client: Any, name: str, sql_types: dict[str, str]) -> None:
    with client.with_staging_dataset():  # dlt's staging copy of the table, for merges and replaces
        if client.has_dataset() and _table_exists(client, name):
            staged = client.make_qualified_table_name(name)
            for column, sql_type in sql_types.items():
                escaped = client.escape_column_name(column)
                client.execute_sql(
                    f"ALTER TABLE {staged} ALTER COLUMN {escaped} TYPE {sql_type} USING CAST(NULL AS {sql_type})"
                )


def _rebuild(pipeline: Any, name: str, sql_types: dict[str, str], load: Any, postgres: bool) -> None:
    """Rebuild table ``name`` with the new ``sql_types`` where the warehouse cannot cast: ``load`` loads the
    source's rows into a scratch pipeline's dataset ``<dataset>_rebuild`` (dlt creates it with the new types);
    then, in one transaction, the columns are emptied (``USING NULL``: no cast), the rows replaced by the scratch
    copy, the views created again. The scratch dataset is dropped afterwards (and before: a killed rebuild's)."""
    import shutil
    import tempfile

    import dlt

    work = tempfile.mkdtemp(prefix=f"datamart-rebuild-{pipeline.pipeline_name}-")
    scratch = dlt.pipeline(
        pipeline_name=f"{pipeline.pipeline_name}{REBUILD_SUFFIX}",
        destination=pipeline.destination,
        dataset_name=f"{pipeline.dataset_name}{REBUILD_SUFFIX}",
        pipelines_dir=work,
    )
    try:
        _drop_scratch(scratch)
        load(scratch)
        with scratch.sql_client() as scratch_client:
            source = scratch_client.make_qualified_table_name(name)
        with pipeline.destination_client() as job:
            client = job.sql_client
            qualified = client.make_qualified_table_name(name)
            with client.begin_transaction():
                views = _dependent_views(client, qualified) if postgres else []
                _drop_views(client, views)
                for column, sql_type in sql_types.items():
                    escaped = client.escape_column_name(column)
                    client.execute_sql(
                        f"ALTER TABLE {qualified} ALTER COLUMN {escaped} TYPE {sql_type} USING CAST(NULL AS {sql_type})"
                    )
                _empty_staging_columns(client, name, sql_types)
                common = [c for c in _table_columns(client, qualified) if c in set(_table_columns(client, source))]
                listed = ", ".join(client.escape_column_name(c) for c in common)
                client.execute_sql(f"DELETE FROM {qualified}")
                client.execute_sql(f"INSERT INTO {qualified} ({listed}) SELECT {listed} FROM {source}")
                _create_views(client, views)
        if os.environ.get(FAIL_ENV) == "after-swap":
            raise RuntimeError(f"{FAIL_ENV}=after-swap: stopped after the rebuild, before dlt's schema was saved")
    finally:
        _drop_scratch(scratch)
        shutil.rmtree(work, ignore_errors=True)


def _table_columns(client: Any, qualified: str) -> list[str]:
    """The columns of a table as the warehouse has them (a column dlt's schema knows may not exist yet)."""
    with client.execute_query(f"SELECT * FROM {qualified} WHERE 1 = 0") as cursor:
        return [d[0] for d in cursor.description]


def _drop_scratch(scratch: Any) -> None:
    with scratch.sql_client() as client:
        for dataset in (client.fully_qualified_dataset_name(), client.fully_qualified_dataset_name(staging=True)):
            client.execute_sql(f"DROP SCHEMA IF EXISTS {dataset} CASCADE")


def _drop_views(client: Any, views: list[dict[str, Any]]) -> None:
    for view in reversed(views):  # the views over views first
        client.execute_sql(f"DROP VIEW {view['name']}")


def _create_views(client: Any, views: list[dict[str, Any]]) -> None:
    """Create the views again as they were (definition, options, owner, grants, comment); raises
    :class:`RetypeRefused` naming the first that cannot be created over the new types."""
    for view in views:
        options = f" WITH ({', '.join(view['options'])})" if view["options"] else ""
        try:
            client.execute_sql(f"CREATE VIEW {view['name']}{options} AS {view['definition']}")
        except Exception as exc:
            raise RetypeRefused(
                f"view {view['name']} cannot be created again over the new type ({_first_line(exc)})",
                view=view["name"],
            ) from exc
        if view["owner"] != view["current_user"]:
            client.execute_sql(f"ALTER VIEW {view['name']} OWNER TO {view['owner']}")
        for grantee, privilege in view["grants"]:
            client.execute_sql(f"GRANT {privilege} ON {view['name']} TO {grantee}")
        if view["comment"] is not None:
            client.execute_sql(f"COMMENT ON VIEW {view['name']} IS %s", view["comment"])


def _dependent_views(client: Any, qualified: str) -> list[dict[str, Any]]:
    """The views reading the table, directly or through other views, in the order they can be created: definition,
    options, owner, grants (aclexplode) and comment of each."""
    rows = client.execute_sql(
        """
        WITH RECURSIVE deps(oid, depth) AS (
            SELECT r.ev_class, 1 FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid
            WHERE d.refobjid = to_regclass(%s) AND r.ev_class <> d.refobjid
            UNION
            SELECT r.ev_class, deps.depth + 1 FROM deps
            JOIN pg_depend d ON d.refobjid = deps.oid
            JOIN pg_rewrite r ON r.oid = d.objid
            WHERE r.ev_class <> d.refobjid AND deps.depth < 50
        )
        SELECT format('%%I.%%I', n.nspname, c.relname), c.relkind, max(deps.depth), pg_get_viewdef(c.oid),
               c.reloptions, quote_ident(pg_get_userbyid(c.relowner)), quote_ident(current_user),
               obj_description(c.oid, 'pg_class'),
               (SELECT array_agg(CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee))
                                 END || ' ' || a.privilege_type)
                FROM aclexplode(c.relacl) a WHERE a.grantee <> c.relowner)
        FROM deps JOIN pg_class c ON c.oid = deps.oid JOIN pg_namespace n ON n.oid = c.relnamespace
        GROUP BY c.oid, n.nspname, c.relname, c.relkind, c.reloptions, c.relowner, c.relacl
        ORDER BY max(deps.depth), 1
        """,
        qualified,
    )
    views = []
    for name, kind, _depth, definition, options, owner, current, comment, grants in rows or []:
        if kind != "v":
            raise RuntimeError(f"{name} (a materialized view) reads the table: refresh it by hand")
        pairs = [g.rsplit(" ", 1) for g in grants or []]
        views.append(
            {
                "name": name,
                "definition": definition.rstrip().rstrip(";"),
                "options": list(options or []),
                "owner": owner,
                "current_user": current,
                "comment": comment,
                "grants": [(grantee, privilege) for grantee, privilege in pairs],
            }
        )
    return views
