"""REST API pipelines: a declaration turned into dlt's declarative ``rest_api`` source (``RESTAPIConfig``).

The declaration stays close to dlt's own config so that dlt's documentation applies: ``source`` holds the client
(``base_url``, ``auth``, ``headers``, ``paginator``) and each table's ``endpoint`` is dlt's endpoint, passed through.
Only what our declarations own is translated: ``cursor`` becomes ``endpoint.incremental.cursor_path``,
``write_disposition`` and ``primary_key`` become the resource hints, and secrets are looked up by name
(``sources.<pipeline>.token`` / ``api_key`` / ``username`` + ``password`` / ``client_id`` + ``client_secret``),
never read from the file.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dlt
from dlt.common.exceptions import DictValidationException
from dlt.common.validation import validate_dict
from dlt.extract.resource import DltResource
from dlt.sources.rest_api import rest_api_resources
from dlt.sources.rest_api.config_setup import create_paginator
from dlt.sources.rest_api.typing import (
    Endpoint,
    HeaderCursorPaginatorConfig,
    HeaderLinkPaginatorConfig,
    IncrementalConfig,
    JSONLinkPaginatorConfig,
    JSONResponseCursorPaginatorConfig,
    OffsetPaginatorConfig,
    PageNumberPaginatorConfig,
    PaginatorTypeConfig,
)

from datamart.errors import closest
from datamart.errors import declaration_error as _fail
from datamart.settings import SettingsError, env_name, secret

if TYPE_CHECKING:  # declarations.py calls this module to check the rest_api parts of a declaration
    from datamart.ingest.declarations import PipelineDecl, TableDecl

REST_TABLE_KEYS: set[str] = {"endpoint", "include_from_parent", "max_table_nesting"}

SOURCE_KEYS = ("kind", "base_url", "auth", "headers", "paginator")

# auth type -> (secrets read from sources.<pipeline>.<name>, non-secret keys the declaration may set)
AUTH_TYPES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "bearer": (("token",), ()),
    "api_key": (("api_key",), ("name", "location")),
    "http_basic": (("username", "password"), ()),
    "oauth2_client_credentials": (
        ("client_id", "client_secret"),
        ("access_token_url", "access_token_request_data", "default_token_expiration"),
    ),
}
API_KEY_LOCATIONS = ("header", "query", "param", "cookie")

PAGINATOR_CONFIGS: dict[str, Any] = {
    "page_number": PageNumberPaginatorConfig,
    "offset": OffsetPaginatorConfig,
    "json_link": JSONLinkPaginatorConfig,
    "header_link": HeaderLinkPaginatorConfig,
    "header_cursor": HeaderCursorPaginatorConfig,
    "cursor": JSONResponseCursorPaginatorConfig,
    "single_page": PaginatorTypeConfig,
    "auto": PaginatorTypeConfig,
}

ENDPOINT_KEYS = tuple(sorted(set(Endpoint.__optional_keys__) - {"auth"}))
# `cursor_path` is the table's `cursor`; `convert` (a Python callable) cannot be written in YAML.
INCREMENTAL_KEYS = tuple(
    sorted(
        (IncrementalConfig.__required_keys__ | IncrementalConfig.__optional_keys__)
        - {"cursor_path", "convert", "transform", "primary_key"}
    )
)

# Header and query parameter names that carry credentials: their value is a secret, never written in a declaration.
SECRET_NAMES = {
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
    "api_key",
    "apikey",
    "token",
    "access_token",
    "access-token",
    "key",
    "secret",
    "client_secret",
    "password",
    "pwd",
}


def _secret_hint(pipeline: str, name: str) -> str:
    key = f"sources.{pipeline}.{name}"
    return f"set {env_name(key)} or [sources.{pipeline}] {name} in .dlt/secrets.toml"


def validate_rest_declaration(path: Path, source: dict[str, Any], tables: dict[str, dict[str, Any]]) -> None:
    """Check the rest_api parts of a declaration; raise a DeclarationError naming the file, the key and the fix."""
    pipeline = path.stem
    unknown = sorted(set(source) - set(SOURCE_KEYS))
    if unknown:
        raise _fail(
            path,
            f"source.{unknown[0]}",
            f"unknown key for a rest_api source{closest(unknown[0], SOURCE_KEYS)}; allowed: {', '.join(SOURCE_KEYS)}",
        )
    _check_base_url(path, pipeline, source.get("base_url"))
    _check_auth(path, pipeline, source.get("auth"))
    _check_no_inline_secrets(path, "source.headers", source.get("headers"))
    _check_paginator(path, "source.paginator", source.get("paginator"))
    for name, decl in tables.items():
        _check_table(path, name, decl or {}, tables)


def _check_base_url(path: Path, pipeline: str, base_url: Any) -> None:
    key = f"sources.{pipeline}.base_url"
    if base_url is None:
        if dlt.config.get(key):
            return
        raise _fail(
            path,
            "source.base_url",
            f"missing: write the API root, e.g. base_url: https://api.example.org/v1, or set {env_name(key)} "
            f"(or [sources.{pipeline}] base_url in .dlt/config.toml)",
        )
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
        raise _fail(path, "source.base_url", f"{base_url!r} is not an http(s) URL, e.g. https://api.example.org/v1")


def _check_auth(path: Path, pipeline: str, auth: Any) -> None:
    if auth is None:
        return
    if isinstance(auth, str):
        auth = {"type": auth}
    if not isinstance(auth, dict):
        raise _fail(path, "source.auth", "expected a mapping such as {type: bearer}")
    auth_type = auth.get("type", "bearer")  # dlt's default too
    if auth_type not in AUTH_TYPES:
        raise _fail(path, "source.auth.type", f"{auth_type!r} is not one of {', '.join(AUTH_TYPES)}")
    secrets, settings = AUTH_TYPES[auth_type]
    for key in auth:
        if key in secrets:
            raise _fail(
                path,
                f"source.auth.{key}",
                f"a secret is never written in the declaration: remove it and {_secret_hint(pipeline, key)}",
            )
        if key != "type" and key not in settings:
            allowed = ", ".join(("type", *settings))
            raise _fail(path, f"source.auth.{key}", f"unknown key for auth type {auth_type}; allowed: {allowed}")
    if auth_type == "api_key" and auth.get("location", "header") not in API_KEY_LOCATIONS:
        raise _fail(path, "source.auth.location", f"{auth['location']!r} is not one of {', '.join(API_KEY_LOCATIONS)}")
    if auth_type == "oauth2_client_credentials" and not auth.get("access_token_url"):
        raise _fail(path, "source.auth.access_token_url", "missing: the URL the client credentials are exchanged at")


def _check_no_inline_secrets(path: Path, where: str, values: Any) -> None:
    if values is None:
        return
    if not isinstance(values, dict):
        raise _fail(path, where, "expected a mapping of names to values")
    for name in values:
        if str(name).lower() in SECRET_NAMES and not isinstance(values[name], dict):
            raise _fail(
                path,
                f"{where}.{name}",
                "looks like a credential written in the declaration: remove it and declare source.auth "
                "(bearer, api_key, http_basic), whose secret is read from dlt secrets",
            )


def _check_paginator(path: Path, where: str, paginator: Any) -> None:
    if paginator is None:
        return
    config = {"type": paginator} if isinstance(paginator, str) else paginator
    if not isinstance(config, dict):
        raise _fail(path, where, "expected a paginator type or a mapping such as {type: page_number, ...}")
    kind = config.get("type", "auto")
    if kind not in PAGINATOR_CONFIGS:
        raise _fail(path, f"{where}.type", f"{kind!r} is not one of {', '.join(PAGINATOR_CONFIGS)}")
    spec = PAGINATOR_CONFIGS[kind]
    allowed = spec.__required_keys__ | spec.__optional_keys__
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise _fail(
            path,
            f"{where}.{unknown[0]}",
            f"unknown key for paginator {kind}{closest(unknown[0], allowed)}; allowed: {', '.join(sorted(allowed))}",
        )
    try:
        create_paginator(config)
    except (TypeError, ValueError) as exc:
        raise _fail(path, where, f"dlt cannot build this {kind} paginator: {exc}") from None


def _check_table(path: Path, name: str, decl: dict[str, Any], tables: dict[str, dict[str, Any]]) -> None:
    where = f"tables.{name}"
    for key in ("files", "format"):
        if key in decl:
            raise _fail(path, f"{where}.{key}", "a filesystem key; a rest_api table declares an endpoint instead")
    endpoint = decl.get("endpoint")
    if isinstance(endpoint, str):
        endpoint = {"path": endpoint}
    if not isinstance(endpoint, dict) or not endpoint.get("path"):
        raise _fail(
            path,
            f"{where}.endpoint.path",
            f"missing: the path under base_url this table is read from, e.g. endpoint: {{path: {name}}}",
        )
    unknown = sorted(set(endpoint) - set(ENDPOINT_KEYS))
    if "auth" in unknown:
        raise _fail(path, f"{where}.endpoint.auth", "auth is declared once, under source.auth (its secret by name)")
    if unknown:
        raise _fail(
            path, f"{where}.endpoint.{unknown[0]}", f"unknown endpoint key; allowed: {', '.join(ENDPOINT_KEYS)}"
        )
    _check_no_inline_secrets(path, f"{where}.endpoint.headers", endpoint.get("headers"))
    _check_no_inline_secrets(path, f"{where}.endpoint.params", endpoint.get("params"))
    for param, value in (endpoint.get("params") or {}).items():
        if isinstance(value, dict) and value.get("type") == "incremental":
            raise _fail(
                path,
                f"{where}.endpoint.params.{param}",
                f"declare the incremental parameter as endpoint.incremental: {{start_param: {param}, "
                f"initial_value: ...}} and the record field as {where}.cursor",
            )
        if isinstance(value, dict) and value.get("type") == "resolve" and value.get("resource") not in tables:
            raise _fail(
                path,
                f"{where}.endpoint.params.{param}.resource",
                f"{value.get('resource')!r} is not a table of this pipeline; declared: {', '.join(tables)}",
            )
    _check_paginator(path, f"{where}.endpoint.paginator", endpoint.get("paginator"))
    _check_incremental(path, where, decl, endpoint.get("incremental"))
    try:
        validate_dict(Endpoint, {k: v for k, v in endpoint.items() if k != "paginator"}, path=".")
    except DictValidationException as exc:
        key = f"{where}.endpoint" + (f".{exc.field}" if exc.field else "")
        raise _fail(path, key, f"{exc.msg} (see dlt's rest_api endpoint configuration)") from None


def _check_incremental(path: Path, where: str, decl: dict[str, Any], incremental: Any) -> None:
    if incremental is None:
        return
    key = f"{where}.endpoint.incremental"
    if not isinstance(incremental, dict):
        raise _fail(path, key, "expected a mapping such as {start_param: updated_since, initial_value: ...}")
    if "cursor_path" in incremental:
        raise _fail(
            path,
            f"{key}.cursor_path",
            f"write the record field to track as {where}.cursor: {incremental['cursor_path']} (it is passed to dlt as "
            "cursor_path)",
        )
    unknown = sorted(set(incremental) - set(INCREMENTAL_KEYS))
    if unknown:
        raise _fail(path, f"{key}.{unknown[0]}", f"unknown incremental key; allowed: {', '.join(INCREMENTAL_KEYS)}")
    if not decl.get("cursor"):
        raise _fail(
            path,
            f"{where}.cursor",
            "endpoint.incremental needs the record field to track, e.g. cursor: updated_at",
        )


def rest_base_url(pipeline: PipelineDecl) -> str:
    """The API root: ``source.base_url`` of the declaration, else the config value ``sources.<name>.base_url``."""
    key = f"sources.{pipeline.name}.base_url"
    url = pipeline.options.get("base_url") or dlt.config.get(key)
    if not url:
        raise SettingsError(
            f"pipeline '{pipeline.name}': no API root. Write source.base_url in {pipeline.path.name} or set "
            f"{env_name(key)} (or [sources.{pipeline.name}] base_url in .dlt/config.toml)."
        )
    return str(url)


def rest_auth(pipeline: PipelineDecl) -> dict[str, Any] | None:
    """The declared auth with its secrets read from ``sources.<name>.<secret>``; stops when one is missing."""
    auth = pipeline.options.get("auth")
    if auth is None:
        return None
    auth = {"type": auth} if isinstance(auth, str) else dict(auth)
    auth.setdefault("type", "bearer")
    secrets, _ = AUTH_TYPES[auth["type"]]
    for name in secrets:
        value = secret(f"sources.{pipeline.name}.{name}")
        if not value:
            raise SettingsError(
                f"pipeline '{pipeline.name}': auth type {auth['type']} needs the secret sources.{pipeline.name}.{name}"
                f": {_secret_hint(pipeline.name, name)}. Nothing was requested."
            )
        auth[name] = str(value)
    return auth


def _endpoint(table: TableDecl, raw: dict[str, Any]) -> dict[str, Any]:
    """dlt's endpoint config of one table: the declared endpoint, with the table's cursor as incremental cursor."""
    endpoint = raw["endpoint"]
    endpoint = {"path": endpoint} if isinstance(endpoint, str) else copy.deepcopy(endpoint)
    if table.cursor:
        incremental = dict(endpoint.get("incremental") or {})
        incremental["cursor_path"] = table.cursor
        if table.write_disposition != "merge":
            # Append tables: start strictly after the last value seen (as sql_database tables do). Merge tables
            # re-read the last cursor value (closed range) and dlt drops the rows it already saw by primary key.
            incremental.setdefault("range_start", "open")
        endpoint["incremental"] = incremental
    return endpoint


def build_rest_resources(
    pipeline: PipelineDecl, tables: list[TableDecl], raw_tables: dict[str, dict[str, Any]]
) -> list[DltResource]:
    """One dlt rest_api resource per table in ``tables``, with write disposition, primary key and incremental."""
    source = {"kind": pipeline.kind, **pipeline.options}
    validate_rest_declaration(pipeline.path, source, raw_tables)
    client: dict[str, Any] = {"base_url": rest_base_url(pipeline)}
    auth = rest_auth(pipeline)  # before anything is requested: a missing secret stops here
    if auth:
        client["auth"] = auth
    for key in ("headers", "paginator"):
        if pipeline.options.get(key) is not None:
            client[key] = copy.deepcopy(pipeline.options[key])
    resources: list[dict[str, Any]] = []
    # Every declared table is configured, so that a selected child endpoint still finds its parent resource.
    for name, raw in raw_tables.items():
        raw = raw or {}
        table = pipeline.table(name)
        resource: dict[str, Any] = {
            "name": name,
            "endpoint": _endpoint(table, raw),
            "write_disposition": table.write_disposition,
        }
        if table.primary_key:
            resource["primary_key"] = list(table.primary_key)
        for key in REST_TABLE_KEYS - {"endpoint"}:
            if key in raw:
                resource[key] = copy.deepcopy(raw[key])
        resources.append(resource)
    config: Any = {"client": client, "resources": resources}  # dlt's RESTAPIConfig
    built = {r.name: r for r in rest_api_resources(config)}
    return [built[t.name] for t in tables]
