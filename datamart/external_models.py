"""Generate ``external_models.yaml`` (the raw tables SQLMesh reads) from the dlt pipelines' own schemas.

Command: ``python -m datamart.external_models`` writes the file; ``--check`` exits 1 and prints a unified diff when
the committed file is stale (a declaration or the source changed without regenerating).

Where the schemas come from: a dlt schema is only complete after a run. Reflecting a ``sql_database`` table gives
the source's columns, but the coarsened personal columns (``birth_date`` → ``birth_year``) are typed from the data
and ``_dlt_load_id`` is added by the normalize step, so "extracting nothing" cannot give the final columns. So:

- a pipeline declared ``demo: true`` (it reads the generated demo source, docs/demo-source.md: ``app_db`` and
  ``bucket``) is run with the project's own code (:func:`run_pipeline`) on the demo source generated at a small scale
  into a temporary folder, loading into a temporary DuckDB file with temporary dlt working dirs, and its
  ``default_schema`` is taken. It needs no warehouse, no secret and no network, works on a fresh clone and is
  deterministic (the demo is seeded); it never reads the developer's or production's data.
- any other pipeline (one the project added, or a demo pipeline it replaced with its own source) cannot run on the
  demo: its schema is the one of its last run, ``dlt pipeline <name> run``, on the selected warehouse (the dlt
  working dir, else the schema dlt stored in the warehouse). Without any run, its entries already in
  external_models.yaml are kept as they are (and named on stderr); a pipeline with neither stops the command with
  the ``dlt pipeline <name> run`` to do first.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from dlt.common.schema import Schema

from datamart.ingest.declarations import VALID_FROM, VALID_TO, DeclarationError, PipelineDecl, TableDecl, load_all
from datamart.ingest.deletes import DELETED_MARKER
from datamart.ingest.history import ROW_VERSION
from datamart.ingest.personal import DROP, HASH, HMAC_KEY_SECRET, YEAR, year_column
from datamart.settings import PROJECT_ROOT, Warehouse, configure_environment, duckdb_warehouse, keep_files_private

EXTERNAL_MODELS_PATH = PROJECT_ROOT / "external_models.yaml"
COMMAND = "python -m datamart.external_models"
DEMO_SCALE = 0.05  # the schema does not depend on the volume; small keeps the generation at a few seconds
DLT_LOAD_ID = "_dlt_load_id"
# dlt's defaults for a decimal without precision (DuckDB and PostgreSQL capabilities: DECIMAL(38,9))
DEFAULT_DECIMAL = (38, 9)

HEADER = f"""\
# GENERATED FILE, do not edit: regenerate with `{COMMAND}` (or `make external-models`);
# tests/test_external_models.py fails when it is stale.
# The raw tables loaded by dlt (pipelines/*.yaml), declared for SQLMesh from the dlt pipelines' own schemas, as
# produced by running every declared pipeline on the demo source. Names are <dataset>.<table>; SQLMesh qualifies
# them with the gateway's default catalog.
# dlt's own columns: `{DLT_LOAD_ID}` (the load that wrote the row) is declared, staging may use it. Not declared:
# `_dlt_id` (a row key dlt adds only to tables loaded from non-arrow items, e.g. CSV: present or not depending on
# the reader, meaningless for analyses) and `{DELETED_MARKER}` (the hard-delete marker: created only once a
# deletion has happened, and always null in the table since marked rows are removed by the merge).
# History tables (`history: scd2`) also declare `{VALID_FROM}` and `{VALID_TO}` (each version's validity), not
# `{ROW_VERSION}` (the hash of the row that dlt's scd2 compares).
"""

# dlt data type -> SQLMesh type (DuckDB dialect, as dlt creates it in DuckDB)
_SIMPLE_TYPES = {
    "text": "text",
    "double": "double",
    "bool": "boolean",
    "date": "date",
    "time": "time",
    "json": "json",
    "binary": "blob",
}
_INTEGER_TYPES = ((8, "tinyint"), (16, "smallint"), (32, "integer"), (64, "bigint"), (128, "hugeint"))


class ExternalModelsError(RuntimeError):
    """The schemas cannot be turned into external models; the message names the pipeline, table and fix."""


@dataclass(frozen=True)
class DemoSource:
    """A generated demo source: the SQLite application database and the bucket folder."""

    source_url: str
    bucket: Path


def sqlmesh_type(column: dict[str, Any], where: str) -> str:
    """The SQLMesh (DuckDB dialect) type of a dlt column schema."""
    data_type = column.get("data_type")
    precision = column.get("precision")
    if data_type in _SIMPLE_TYPES:
        return _SIMPLE_TYPES[data_type]
    if data_type == "bigint":
        if precision is None:
            return "bigint"
        for bits, name in _INTEGER_TYPES:
            if precision <= bits:
                return name
        raise ExternalModelsError(f"{where}: bigint with precision {precision} bits has no DuckDB integer type")
    if data_type == "timestamp":
        # dlt's default is timezone-aware; sources with naive timestamps carry the hint timezone: false
        return "timestamptz" if column.get("timezone", True) else "timestamp"
    if data_type == "decimal":
        scale = column.get("scale")
        if precision is None:
            return "decimal({},{})".format(*DEFAULT_DECIMAL)
        return f"decimal({precision},{DEFAULT_DECIMAL[1] if scale is None else scale})"
    if data_type == "wei":
        return f"decimal({precision or DEFAULT_DECIMAL[0]},{column.get('scale') or 0})"
    raise ExternalModelsError(
        f"{where}: dlt data type {data_type!r} has no SQLMesh mapping; add it to datamart/external_models.py"
    )


def table_description(decl: PipelineDecl, table: TableDecl) -> str:
    """Which pipeline loads the table and how: write disposition, key, cursor, deletes, columns never loaded."""
    key = ", ".join(table.primary_key)
    text = f"Loaded by dlt pipeline {decl.name} (pipelines/{decl.path.name})"
    if table.write_disposition == "merge":
        text += f", merged on {key}"
        if table.history:
            text += (
                f"; every version kept (history: scd2): {VALID_FROM} and {VALID_TO} say when each was loaded and "
                f"replaced, the current version of a key has no {VALID_TO}"
            )
        if table.deletes:
            detected = []
            if table.deletes.get("soft"):
                detected.append(f"soft deletes by {table.deletes['soft']}")
            if table.deletes.get("hard") == "key_set":
                detected.append(f"hard deletes found by comparing the {key} key sets at each run")
            if table.history:
                text += f"; deleted rows have their current version retired ({', '.join(detected)})"
            else:
                text += f"; current state, deleted rows removed ({', '.join(detected)})"
        elif table.history:
            text += " (rows deleted at the source keep their current version)"
        else:
            text += "; current state (rows deleted at the source are kept)"
    elif table.write_disposition == "append":
        text += ", append-only; rows are never updated nor deleted"
        if key:
            text += f" (primary key {key})"
    else:
        text += "; replaced whole at every run"
    if table.cursor:
        text += f"; incremental on {table.cursor}"
        if decl.kind == "filesystem":
            text += " (only files new or changed since the last run are read)"
    dropped = [c for c, treatment in table.personal.items() if treatment == DROP]
    if dropped:
        text += f". Personal columns never loaded ({', '.join(dropped)})"
    return text + "."


def column_descriptions(table: TableDecl, columns: list[str]) -> dict[str, str]:
    """Descriptions of the columns with a declared treatment: personal data, soft-delete marker, dlt's load id."""
    described: dict[str, str] = {}
    for source_column, treatment in table.personal.items():
        if treatment == HASH:
            described[source_column] = (
                f"Pseudonymised: keyed HMAC-SHA256 (hex) of the {source_column} with the secret {HMAC_KEY_SECRET}; "
                "same value, same pseudonym."
            )
        elif treatment == YEAR:
            described[year_column(source_column)] = (
                f"Year of {source_column} (coarsened at extraction: the date never leaves the source)."
            )
    soft = table.deletes.get("soft")
    if soft:
        described[soft] = "Soft-delete marker of the source: rows where it is set are removed at load (always null)."
        if table.history:
            described[soft] = (
                "Soft-delete marker of the source: a row read with it set retires the current version (always null)."
            )
    if table.history:
        described[VALID_FROM] = "When the load that inserted this version ran (UTC)."
        described[VALID_TO] = "When a later load replaced this version or found it deleted (UTC); null: current."
    described[DLT_LOAD_ID] = "The dlt load that wrote the row" + (
        " (or last updated it)." if table.write_disposition == "merge" else "."
    )
    return {c: described[c] for c in columns if c in described}


def external_model(decl: PipelineDecl, table: TableDecl, schema: Schema) -> dict[str, Any]:
    """The external-model entry of one declared table, its columns in the order of the dlt schema."""
    where = f"pipeline {decl.name}, table {table.name}"
    if table.name not in schema.tables:
        raise ExternalModelsError(
            f"{where}: not in dlt's schema '{schema.name}' (nothing was ever loaded into it); run the pipeline "
            f"once so that it is created, then rerun `{COMMAND}`"
        )
    columns = {
        name: sqlmesh_type(dict(column), f"{where}, column {name}")
        for name, column in schema.get_table_columns(table.name).items()  # complete columns only: typed, loaded
        if name == DLT_LOAD_ID
        or (table.history and name in (VALID_FROM, VALID_TO))
        or not (name.startswith("_dlt_") or name in (DELETED_MARKER, ROW_VERSION))
    }
    entry: dict[str, Any] = {
        "name": f"{decl.dataset}.{table.name}",
        "description": table_description(decl, table),
        "dialect": "duckdb",
        "columns": columns,
    }
    descriptions = column_descriptions(table, list(columns))
    if descriptions:
        entry["column_descriptions"] = descriptions
    return entry


def render_external_models(
    schemas: list[tuple[PipelineDecl, Schema]], kept: dict[str, str] | None = None, order: list[str] | None = None
) -> str:
    """The text of external_models.yaml: every declared table of every pipeline, in declaration order.

    ``kept``: sections taken as they are (pipelines with no schema here), placed by ``order`` (pipeline names).
    """
    kept = kept or {}
    rendered: dict[str, str] = {}
    for decl, schema in schemas:
        title = f"# --- {decl.dataset}: pipeline {decl.name} (pipelines/{decl.path.name}) ---"
        if decl.description:
            title += f"\n# {decl.description}"
        entries = [
            yaml.safe_dump([external_model(decl, table, schema)], sort_keys=False, allow_unicode=True, width=100)
            for table in decl.tables
        ]
        rendered[decl.name] = title + "\n" + "\n".join(entries)
    names = order or [decl.name for decl, _ in schemas]
    sections = [HEADER]
    for name in names:
        if name in rendered:
            sections.append(rendered[name])
        elif name in kept:
            sections.append(kept[name].rstrip("\n") + "\n")
    sections.append(render_ops_models())
    return "\n".join(sections)


def render_ops_models() -> str:
    """The run-record tables of schema ``ops`` (written by every pipeline run, read by marts.data_freshness_v1)."""
    from datamart.ingest.ops import (
        DELETED_ROWS_COLUMNS,
        DELETED_ROWS_TABLE,
        OPS_SCHEMA,
        REFRESHES_COLUMNS,
        REFRESHES_TABLE,
        RUN_TABLES_COLUMNS,
        RUN_TABLES_TABLE,
        RUNS_COLUMNS,
        RUNS_TABLE,
        SLOTS_COLUMNS,
        SLOTS_TABLE,
    )

    described = {
        RUNS_TABLE: ("One row per run of a pipeline: when, where, status and error.", RUNS_COLUMNS),
        RUN_TABLES_TABLE: ("One row per table of a succeeded pipeline run: rows read and written.", RUN_TABLES_COLUMNS),
        REFRESHES_TABLE: (
            "One row per refresh of the published views: when, by which command, what it rebuilt.",
            REFRESHES_COLUMNS,
        ),
        SLOTS_TABLE: (
            "One row per run of a replication pipeline: its slot's retained WAL and lag on the source.",
            SLOTS_COLUMNS,
        ),
        DELETED_ROWS_TABLE: (
            "One row per row a delete removed from a raw table, with what it referred to: what incremental marts "
            "recompute.",
            DELETED_ROWS_COLUMNS,
        ),
    }
    entries = [
        yaml.safe_dump(
            [
                {
                    "name": f"{OPS_SCHEMA}.{table}",
                    "description": f"Run records written by datamart/ingest/ops.py. {text}",
                    "dialect": "duckdb",
                    "columns": {name: sql_type.lower() for name, (sql_type, _) in columns.items()},
                    "column_descriptions": {name: doc for name, (_, doc) in columns.items()},
                }
            ],
            sort_keys=False,
            allow_unicode=True,
            width=100,
        )
        for table, (text, columns) in described.items()
    ]
    return f"# --- {OPS_SCHEMA}: run records of every pipeline run (datamart/ingest/ops.py) ---\n" + "\n".join(entries)


def generate_demo_source(work_dir: Path, scale: float = DEMO_SCALE) -> DemoSource:
    """Generate the demo source (day 0) into ``work_dir``: a SQLite application database and a bucket folder."""
    from datamart import demo

    work_dir.mkdir(parents=True, exist_ok=True)
    source = DemoSource(source_url=f"sqlite:///{work_dir / 'app.sqlite'}", bucket=work_dir / "bucket")
    demo.generate(source_url=source.source_url, bucket=source.bucket, scale=scale)
    return source


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore the previous values."""
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def dlt_schemas_from_declarations(
    source: DemoSource | None, work_dir: Path, declarations: list[PipelineDecl] | None = None
) -> list[tuple[PipelineDecl, Schema]]:
    """Each demo pipeline's dlt schema after a first run on ``source`` into a fresh DuckDB file under ``work_dir``.

    Only the pipelines declared ``demo: true``; the others are left out (see :func:`last_run_schema`).
    """
    from datamart.ingest.runner import make_pipeline, run_pipeline

    declarations = [d for d in (load_all() if declarations is None else declarations) if d.demo]
    if not declarations:
        return []
    if source is None:
        raise ExternalModelsError("demo pipelines need a generated demo source")
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=work_dir))  # always from scratch: no earlier state
    warehouse = duckdb_warehouse(run_dir / "warehouse.duckdb")
    env = {"DATAMART__PII_HMAC_KEY": "external-models-generation"}  # pseudonyms are thrown away with the run
    for decl in declarations:
        prefix = f"SOURCES__{decl.name.upper()}__"
        if decl.kind == "sql_database":
            env[prefix + "CREDENTIALS"] = source.source_url
        elif decl.kind == "filesystem":
            env[prefix + "BUCKET_URL"] = str(source.bucket)
        else:
            raise DeclarationError(
                f"{decl.path.name}: a {decl.kind} pipeline cannot run on the demo source; external models are "
                "generated for sql_database and filesystem pipelines only"
            )
    schemas = []
    with _environment(env):
        for decl in declarations:
            print(f"external models: running pipeline {decl.name} on the demo source", file=sys.stderr)
            run_pipeline(decl, warehouse, pipelines_dir=run_dir / "pipelines")
            schemas.append((decl, make_pipeline(decl, warehouse, run_dir / "pipelines").default_schema))
    return schemas


def last_run_schema(decl: PipelineDecl, warehouse: Warehouse) -> Schema | None:
    """The dlt schema of the last run of a (non-demo) pipeline on ``warehouse``: the local working dir, else the
    schema dlt stored in the warehouse; None when the pipeline never ran there."""
    from datamart.ingest.runner import make_pipeline

    pipeline = make_pipeline(decl, warehouse)
    if not pipeline.default_schema_name:
        try:
            pipeline.sync_destination()  # a fresh checkout: dlt keeps the schema in the warehouse too
        except Exception as exc:  # noqa: BLE001 - no warehouse, or nothing of this pipeline in it: never ran
            print(f"external models: pipeline {decl.name}: no schema in the warehouse ({exc})", file=sys.stderr)
            return None
    if not pipeline.default_schema_name:
        return None
    schema = pipeline.default_schema
    return schema if any(t.name in schema.tables for t in decl.tables) else None


def committed_sections(text: str) -> dict[str, str]:
    """The sections of an external_models.yaml text, by pipeline name (``ops`` for the run records)."""
    sections: dict[str, str] = {}
    name = None
    for line in text.splitlines(keepends=True):
        match = re.match(r"# --- \S+: pipeline (\S+) ", line)
        if match:
            name = match.group(1)
        elif line.startswith("# --- "):
            name = None
        if name:
            sections[name] = sections.get(name, "") + line
    return sections


def generate_from_demo(work_dir: Path, declarations: list[PipelineDecl] | None = None) -> str:
    """The external_models.yaml text: demo pipelines run on a fresh demo, the others from their last run."""
    declarations = load_all() if declarations is None else declarations
    source = None
    if any(d.demo for d in declarations):
        print(f"external models: generating the demo source (scale {DEMO_SCALE}) in {work_dir}", file=sys.stderr)
        source = generate_demo_source(work_dir / "demo")
    demo_schemas = dict(
        (decl.name, (decl, schema)) for decl, schema in dlt_schemas_from_declarations(source, work_dir, declarations)
    )
    others = [d for d in declarations if not d.demo]
    kept: dict[str, str] = {}
    schemas: list[tuple[PipelineDecl, Schema]] = []
    if others:
        from datamart.settings import resolve_warehouse

        warehouse = resolve_warehouse()
        committed = EXTERNAL_MODELS_PATH.read_text(encoding="utf-8") if EXTERNAL_MODELS_PATH.exists() else ""
        sections = committed_sections(committed)
        missing = []
        for decl in others:
            schema = last_run_schema(decl, warehouse)
            if schema is not None:
                print(
                    f"external models: pipeline {decl.name} from its last run ({warehouse.describe()})", file=sys.stderr
                )
                demo_schemas[decl.name] = (decl, schema)
            elif decl.name in sections:
                print(
                    f"external models: pipeline {decl.name} never ran on {warehouse.describe()}: its committed "
                    "entries are kept as they are",
                    file=sys.stderr,
                )
                kept[decl.name] = sections[decl.name]
            else:
                missing.append(decl.name)
        if missing:
            raise ExternalModelsError(
                f"pipeline(s) {', '.join(missing)}: not fed by the demo source (no `demo: true`) and never run on "
                f"{warehouse.describe()}, so their tables are unknown: run `dlt pipeline <name> run` once for each, "
                f"then `{COMMAND}` again"
            )
    for decl in declarations:
        if decl.name in demo_schemas:
            schemas.append(demo_schemas[decl.name])
    return render_external_models(schemas, kept=kept, order=[d.name for d in declarations])


def main(argv: list[str] | None = None) -> int:
    """Write external_models.yaml, or with ``--check`` print the diff and return 1 when it is stale."""
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 with a diff when the committed file is stale")
    parser.add_argument("--output", type=Path, help=f"write there instead of {EXTERNAL_MODELS_PATH.name}")
    args = parser.parse_args(argv)
    keep_files_private()
    configure_environment()
    with tempfile.TemporaryDirectory(prefix="datamart-external-models-") as tmp:
        try:
            text = generate_from_demo(Path(tmp))
        except (ExternalModelsError, DeclarationError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    relative = EXTERNAL_MODELS_PATH.relative_to(PROJECT_ROOT)
    if args.check:
        committed = EXTERNAL_MODELS_PATH.read_text(encoding="utf-8") if EXTERNAL_MODELS_PATH.exists() else ""
        if committed == text:
            print(f"external models: {relative} is up to date", file=sys.stderr)
            return 0
        diff = difflib.unified_diff(
            committed.splitlines(keepends=True), text.splitlines(keepends=True), f"{relative} (committed)", "generated"
        )
        sys.stdout.writelines(diff)
        print(f"external models: {relative} is stale; regenerate with `{COMMAND}`", file=sys.stderr)
        return 1
    target = args.output or EXTERNAL_MODELS_PATH
    target.write_text(text, encoding="utf-8")
    print(f"external models: wrote {target if args.output else relative}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
