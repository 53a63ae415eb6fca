"""Pipeline declarations: one YAML file per pipeline under ``pipelines/``, read into plain dataclasses.

A declaration says what to load and how; the connection itself is a secret looked up by name
(``sources.<pipeline>.credentials`` / ``SOURCES__<PIPELINE>__CREDENTIALS``), never written in the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from datamart.errors import DeclarationError, closest
from datamart.errors import declaration_error as _fail
from datamart.ingest.personal import KEEP, TREATMENTS
from datamart.ingest.rest import REST_TABLE_KEYS, validate_rest_declaration
from datamart.ingest.slots import parse_size
from datamart.settings import declarations_dir

SOURCE_KINDS = ("sql_database", "filesystem", "rest_api")
WRITE_DISPOSITIONS = ("append", "merge", "replace")
PERSONAL_TREATMENTS = TREATMENTS
FILE_FORMATS = ("csv", "parquet", "jsonl")
SQL_BACKENDS = ("connectorx", "pyarrow", "sqlalchemy")
HISTORY_KINDS = ("scd2",)
#: dlt's validity columns of a ``history: scd2`` table (its defaults); the current version has no valid_to
VALID_FROM, VALID_TO = "_dlt_valid_from", "_dlt_valid_to"


@dataclass(frozen=True)
class TableDecl:
    """One table (or file set) of a pipeline and how it is loaded."""

    name: str
    write_disposition: str = "append"
    primary_key: tuple[str, ...] = ()
    cursor: str | None = None
    personal: dict[str, str] = field(default_factory=dict)
    deletes: dict[str, str] = field(default_factory=dict)  # {"soft": <column>, "hard": "key_set"}
    schema_contract: dict[str, str] = field(default_factory=dict)  # dlt's: tables / columns / data_type
    lag: float | None = None  # re-read window below the last cursor value (seconds for timestamps)
    files: str | None = None  # filesystem sources: glob relative to the bucket
    format: str | None = None  # filesystem sources: csv, parquet, jsonl
    backend: str | None = None  # SQL sources: this table's dlt backend (default: the pipeline's, see sources.py)
    delimiter: str | None = None  # csv files: the field separator when it is not a comma (e.g. ";")
    history: str | None = None  # "scd2": every version of a row kept, with validity dates (see sources.py)

    @property
    def current_only(self) -> str:
        """The SQL condition selecting the rows that mirror the source: the current versions of a history table
        (the others hold one row per key already)."""
        return f'"{VALID_TO}" IS NULL' if self.history else "TRUE"


@dataclass(frozen=True)
class PipelineDecl:
    """A whole pipeline: its source, the dataset it loads into and its tables."""

    name: str
    kind: str
    dataset: str
    tables: tuple[TableDecl, ...]
    path: Path
    description: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    raw_tables: dict[str, dict[str, Any]] = field(default_factory=dict)  # each table's YAML mapping (rest_api)
    verify: bool = False  # reconciled with its source by every scheduled run (``make scheduled``)
    repair: bool = False  # ``verify: repair``: and its differing key ranges reloaded (``verify --repair``)
    # read from the generated demo source (datamart/demo): `make run` generates it when missing, and
    # `make external-models` runs the pipeline on a fresh demo to get its schema
    demo: bool = False

    def table(self, name: str) -> TableDecl:
        """The declared table ``name``, or an error listing the declared ones."""
        for table in self.tables:
            if table.name == name:
                return table
        raise DeclarationError(
            f"{self.path.name}: pipeline '{self.name}' declares no table '{name}'; "
            f"declared: {', '.join(t.name for t in self.tables)}"
        )


_TOP_KEYS = {"name", "description", "source", "dataset", "tables", "verify", "demo"}
_TABLE_KEYS = {
    "write_disposition",
    "primary_key",
    "cursor",
    "personal",
    "deletes",
    "schema_contract",
    "lag",
    "files",
    "format",
    "backend",
    "delimiter",
    "history",
}
CONTRACT_ENTITIES = ("tables", "columns", "data_type")
CONTRACT_MODES = ("evolve", "freeze", "discard_row", "discard_value")


# source: keys per kind besides ``kind`` (rest_api's are checked by datamart/ingest/rest.py)
SOURCE_KEYS: dict[str, tuple[str, ...]] = {
    "sql_database": ("schema", "backend", "chunk_size", "changes", "slot", "publication", "max_retained_wal"),
    "filesystem": ("chunk_size",),
}


def refuse_unknown(path: Path, where: str, keys: Any, allowed: Any) -> None:
    """Refuse the first key of ``keys`` that is not in ``allowed``, naming the closest allowed one."""
    unknown = sorted(set(map(str, keys)) - set(allowed))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise _fail(path, key, f"unknown key{closest(unknown[0], allowed)}; allowed: {', '.join(sorted(allowed))}")


def _read_yaml(path: Path) -> Any:
    """The YAML document of declaration file ``path``; a file that is not YAML (an unclosed ``{``, a bad indent) is a
    :class:`DeclarationError` of one line naming the file, the line and column, and the key it belongs to: PyYAML's
    own message spans several lines and names a ``"<unicode string>"``, not the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise _fail(path, "(file)", f"not UTF-8 text (byte {exc.start}); save the file as UTF-8") from exc
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        # A `{`, `[` or quote left open is noticed lines later: the line that opened it leads. Anything else (a bad
        # indent, a tab) is where PyYAML stopped.
        opened = exc.context_mark is not None and any(w in (exc.context or "") for w in ("flow", "quoted"))
        mark = exc.context_mark if opened else exc.problem_mark
        if mark is None:
            raise _fail(path, "(file)", f"not valid YAML: {' '.join(str(exc).split())}") from exc
        problem = " ".join(str(exc.problem or "").split())
        if exc.context and exc.context_mark is not None:
            problem = f"{exc.context} at {_position(exc.context_mark)}, {problem}"
            if opened and exc.problem_mark is not None:
                problem += f" at {_position(exc.problem_mark)}"
        key = _key_at(text.splitlines(), mark.line) or "(file)"
        message = f"line {mark.line + 1}: {key}: not valid YAML: {problem}; fix the file, then run again"
        raise DeclarationError(f"{path.name}: {message}") from exc
    except yaml.YAMLError as exc:
        raise _fail(path, "(file)", f"not valid YAML: {' '.join(str(exc).split())}") from exc


def _position(mark: Any) -> str:
    """``line L, column C`` of a PyYAML mark, counted from 1 as editors do (PyYAML counts from 0)."""
    return f"line {mark.line + 1}, column {mark.column + 1}"


_KEY_LINE = re.compile(r"^(?P<indent>\s*)(?:-\s+)?(?P<key>[^\s#:{}\[\],'\"][^:#{}\[\]]*?)\s*:(?:\s|$)")


def _key_at(lines: list[str], index: int) -> str:
    """The dotted key (``tables.missions.deletes``) that line ``index`` of a block-style YAML text belongs to: the
    key on that line (or the nearest one above it) and the keys of the less indented lines above, up to the top."""
    path: list[str] = []
    indent = None
    for line in reversed(lines[: index + 1]):
        match = _KEY_LINE.match(line)
        if match is None:
            continue
        depth = len(match["indent"])
        if indent is None or depth < indent:
            path.insert(0, match["key"].strip())
            indent = depth
        if depth == 0:
            break
    return ".".join(path)


def _as_tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def load_declaration(path: Path) -> PipelineDecl:
    """Read and check one declaration file."""
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise _fail(path, "(file)", "expected a mapping with name, source, dataset and tables")
    refuse_unknown(path, "", raw, _TOP_KEYS)
    name = raw.get("name") or path.stem
    if name != path.stem:
        raise _fail(path, "name", f"'{name}' must match the file name '{path.stem}'")
    source = raw.get("source") or {}
    if not isinstance(source, dict):
        raise _fail(path, "source", f"expected a mapping with kind ({', '.join(SOURCE_KINDS)}) and its options")
    kind = source.get("kind")
    if kind not in SOURCE_KINDS:
        raise _fail(
            path, "source.kind", f"{kind!r} is not one of {', '.join(SOURCE_KINDS)}{closest(kind, SOURCE_KINDS)}"
        )
    if kind in SOURCE_KEYS:
        refuse_unknown(path, "source", source, ("kind", *SOURCE_KEYS[kind]))
    if not raw.get("dataset"):
        raise _fail(path, "dataset", "missing: the warehouse schema to load into, e.g. raw_<source>")
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", str(raw["dataset"])):
        raise _fail(
            path,
            "dataset",
            f"{raw['dataset']!r} is not a plain schema name: use lowercase letters, digits and _, e.g. raw_<source> "
            f"(dlt would load into {warehouse_name(str(raw['dataset']))!r} instead)",
        )
    tables_raw = raw.get("tables") or {}
    if not tables_raw:
        raise _fail(path, "tables", "declare at least one table")
    tables = tuple(_load_table(path, kind, tname, tdecl or {}) for tname, tdecl in tables_raw.items())
    _check_changes(path, source, tables_raw)
    raw_tables = {str(tname): dict(tdecl or {}) for tname, tdecl in tables_raw.items()}
    if kind == "rest_api":
        validate_rest_declaration(path, source, raw_tables)
    options = {k: v for k, v in source.items() if k != "kind"}
    verify = raw.get("verify", False)
    if not isinstance(verify, bool) and verify != "repair":
        raise _fail(
            path,
            "verify",
            f"{verify!r}{closest(verify, ['repair'])}: true (every scheduled run compares this pipeline with its "
            "source), repair (and reloads the key ranges that differ: `verify --repair`) or false",
        )
    if not isinstance(raw.get("demo", False), bool):
        raise _fail(path, "demo", "true or false: the pipeline reads the generated demo source (datamart/demo)")
    if raw.get("demo") and kind not in ("sql_database", "filesystem"):
        raise _fail(path, "demo", f"the demo source feeds sql_database and filesystem pipelines, not {kind}")
    return PipelineDecl(
        name=name,
        kind=kind,
        dataset=raw["dataset"],
        tables=tables,
        path=path,
        description=str(raw.get("description", "")).strip(),
        options=options,
        raw_tables=raw_tables,
        verify=bool(verify),
        repair=verify == "repair",
        demo=raw.get("demo", False),
    )


def _load_table(path: Path, kind: str, name: str, decl: dict[str, Any]) -> TableDecl:
    where = f"tables.{name}"
    allowed = _TABLE_KEYS
    if kind == "rest_api":
        allowed = (_TABLE_KEYS - {"files", "format", "delimiter"}) | REST_TABLE_KEYS
    refuse_unknown(path, where, decl, allowed)
    disposition = decl.get("write_disposition", "append")
    if disposition not in WRITE_DISPOSITIONS:
        raise _fail(
            path,
            f"{where}.write_disposition",
            f"{disposition!r} is not one of {WRITE_DISPOSITIONS}{closest(disposition, WRITE_DISPOSITIONS)}",
        )
    primary_key = _as_tuple(decl.get("primary_key"))
    if disposition == "merge" and not primary_key:
        raise _fail(path, f"{where}.primary_key", "a merge table needs a primary_key to merge on")
    if disposition == "replace" and decl.get("cursor"):
        raise _fail(
            path,
            f"{where}.cursor",
            "a replace table is emptied when a run reads nothing new; drop the cursor (reload it whole "
            "every run) or use write_disposition: merge with a primary_key",
        )
    personal = {str(c): str(t) for c, t in (decl.get("personal") or {}).items()}
    for column, treatment in personal.items():
        if treatment not in PERSONAL_TREATMENTS:
            raise _fail(
                path,
                f"{where}.personal.{column}",
                f"{treatment!r} is not one of {PERSONAL_TREATMENTS}{closest(treatment, PERSONAL_TREATMENTS)}",
            )
    contract = decl.get("schema_contract") or {}
    if isinstance(contract, str):
        contract = dict.fromkeys(CONTRACT_ENTITIES, contract)
    for entity, mode in contract.items():
        if entity not in CONTRACT_ENTITIES or mode not in CONTRACT_MODES:
            raise _fail(
                path,
                f"{where}.schema_contract.{entity}",
                f"{entity}: {mode} is not a contract; entities {CONTRACT_ENTITIES}, modes {CONTRACT_MODES}",
            )
    lag = decl.get("lag")
    if lag is not None:
        if not isinstance(lag, int | float) or lag <= 0:
            raise _fail(path, f"{where}.lag", f"{lag!r} is not a positive number (seconds for a timestamp cursor)")
        if not decl.get("cursor") or disposition != "merge":
            raise _fail(
                path,
                f"{where}.lag",
                "a lag re-reads rows below the last cursor value: it needs a cursor and write_disposition: merge "
                "(an append table would load the re-read rows twice)",
            )
    deletes = {str(k): str(v) for k, v in (decl.get("deletes") or {}).items()}
    _check_deletes(path, where, kind, disposition, primary_key, deletes)
    history = decl.get("history")
    if history is not None:
        if history not in HISTORY_KINDS:
            raise _fail(
                path,
                f"{where}.history",
                f"{history!r} is not one of {', '.join(HISTORY_KINDS)}{closest(history, HISTORY_KINDS)}",
            )
        if disposition != "merge" or not primary_key:
            raise _fail(
                path,
                f"{where}.history",
                "history keeps the versions of each key: it needs write_disposition: merge and a primary_key",
            )
        treated = sorted(c for c, t in (decl.get("personal") or {}).items() if t != KEEP)
        if treated:
            raise _fail(
                path,
                f"{where}.history",
                f"the table has personal columns ({', '.join(map(str, treated))}): history keeps every past version, "
                "a deleted row's too, so a person erased in the source would stay in the warehouse; keep the history "
                "in a table without personal data",
            )
    backend = decl.get("backend")
    if backend is not None and (kind != "sql_database" or backend not in SQL_BACKENDS):
        raise _fail(
            path,
            f"{where}.backend",
            f"{backend!r}: a SQL table's backend is one of {', '.join(SQL_BACKENDS)}{closest(backend, SQL_BACKENDS)}",
        )
    if kind == "filesystem":
        if not decl.get("files"):
            raise _fail(path, f"{where}.files", "a file table needs a glob, e.g. exports/*.parquet")
        if decl.get("format") not in FILE_FORMATS:
            raise _fail(path, f"{where}.format", f"{decl.get('format')!r} is not one of {FILE_FORMATS}")
    delimiter = decl.get("delimiter")
    if delimiter is not None and (kind != "filesystem" or decl.get("format") != "csv"):
        raise _fail(path, f"{where}.delimiter", "a delimiter applies to csv files only (format: csv)")
    if delimiter is not None and (not isinstance(delimiter, str) or len(delimiter) != 1 or delimiter in '"\r\n'):
        raise _fail(path, f"{where}.delimiter", f"{delimiter!r} is not one character, e.g. ';' or '\\t'")
    return TableDecl(
        name=name,
        write_disposition=disposition,
        primary_key=primary_key,
        cursor=decl.get("cursor"),
        personal=personal,
        deletes=deletes,
        schema_contract={str(k): str(v) for k, v in contract.items()},
        lag=float(lag) if lag is not None else None,
        files=decl.get("files"),
        format=decl.get("format"),
        backend=backend,
        delimiter=delimiter,
        history=history,
    )


CHANGE_MODES = ("cursor", "replication")


def _check_changes(path: Path, source: dict[str, Any], tables_raw: dict[str, Any]) -> None:
    """``changes: replication`` (datamart/ingest/replication.py): merge tables by key, no cursor, no key-set scan."""
    changes = source.get("changes", "cursor")
    if changes not in CHANGE_MODES:
        raise _fail(
            path,
            "source.changes",
            f"{changes!r} is not one of {', '.join(CHANGE_MODES)}{closest(changes, CHANGE_MODES)}",
        )
    if changes != "replication":
        for key in ("slot", "publication", "max_retained_wal"):
            if key in source:
                raise _fail(path, f"source.{key}", "belongs to changes: replication (its slot and publication)")
        return
    if "max_retained_wal" in source:  # the scheduled run alerts above it (datamart/ingest/slots.py)
        try:
            parse_size(source["max_retained_wal"])
        except ValueError as exc:
            raise _fail(path, "source.max_retained_wal", f"{exc} (the WAL the slot may keep on the source)") from exc
    for key in ("slot", "publication"):
        if key in source and not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", str(source[key])):
            raise _fail(path, f"source.{key}", f"{source[key]!r}: use lowercase letters, digits and _ (63 at most)")
    for name, decl in tables_raw.items():
        decl = decl or {}
        for key in ("cursor", "deletes", "lag"):
            if key in decl:
                raise _fail(
                    path,
                    f"tables.{name}.{key}",
                    "not needed with changes: replication (the slot sends every insert, update and delete): remove it",
                )
        if decl.get("write_disposition") != "merge":
            raise _fail(
                path,
                f"tables.{name}.write_disposition",
                "changes: replication applies each change by key: declare write_disposition: merge and a primary_key",
            )


def _check_deletes(
    path: Path, where: str, kind: str, disposition: str, primary_key: tuple[str, ...], deletes: dict[str, str]
) -> None:
    refuse_unknown(path, f"{where}.deletes", deletes, ("soft", "hard"))
    if deletes and disposition != "merge":
        raise _fail(path, f"{where}.deletes", "deletes apply to merge tables only (set write_disposition: merge)")
    if "hard" in deletes:
        if deletes["hard"] != "key_set":
            raise _fail(path, f"{where}.deletes.hard", f"{deletes['hard']!r} is not a method; use key_set")
        if kind != "sql_database":
            raise _fail(path, f"{where}.deletes.hard", "key_set compares keys with a SQL source: sql_database only")
        if not primary_key:
            raise _fail(path, f"{where}.deletes.hard", "key_set needs the table's primary_key")


def reference_column(table: str) -> str:
    """The conventional column other tables use to refer to a row of ``table`` (``volunteers`` → ``volunteer_id``)."""
    singular = table[:-3] + "y" if table.endswith("ies") else table[:-1] if table.endswith("s") else table
    return f"{singular}_id"


def warehouse_name(identifier: str) -> str:
    """How dlt names a declared table or column in the warehouse (its snake_case naming convention):
    ``Order Lines`` becomes ``order_lines``, ``Line ID`` becomes ``line_id``."""
    from dlt.common.normalizers.naming.snake_case import NamingConvention

    return NamingConvention().normalize_identifier(identifier)


def load_all(directory: Path | None = None) -> list[PipelineDecl]:
    """Every declaration under ``directory`` (default :func:`declarations_dir`), in name order."""
    directory = directory or declarations_dir()
    return [load_declaration(p) for p in sorted(directory.glob("*.yaml"))]


def load_named(name: str, directory: Path | None = None) -> PipelineDecl:
    """The declaration of pipeline ``name``, or an error listing the known ones."""
    directory = directory or declarations_dir()
    path = directory / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(p.stem for p in sorted(directory.glob("*.yaml"))) or "none"
        raise DeclarationError(f"no pipeline named '{name}' in {directory}; known pipelines: {known}")
    return load_declaration(path)
