"""REST API pipelines load from a real local HTTP server into real warehouses: pages, bearer auth, incremental merge."""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from datamart.ingest.declarations import DeclarationError, PipelineDecl, load_declaration
from datamart.ingest.rest import build_rest_resources, validate_rest_declaration
from datamart.ingest.runner import run_pipeline
from datamart.settings import PROJECT_ROOT, SettingsError, Warehouse

EXAMPLE = PROJECT_ROOT / "pipelines" / "examples" / "partner_api.yaml"
TOKEN = "s3cret-partner-token"
PAGE_SIZE = 10  # the server caps pages at 10 records, whatever per_page asks


class PartnerApi:
    """A small partner API on 127.0.0.1: GET /v1/missions, page-number pagination, ``updated_since`` filter."""

    def __init__(self) -> None:
        self.missions = {
            i: {
                "id": i,
                "title": f"Mission {i}",
                "status": "published",
                "contact_email": f"contact{i}@partner.example.org",
                "updated_at": f"2025-01-{i:02d}T08:00:00Z",
            }
            for i in range(1, 26)
        }
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        """The API root, as a declaration's ``source.base_url``."""
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                url = urlsplit(self.path)
                params = {k: v[0] for k, v in parse_qs(url.query).items()}
                with api.lock:
                    api.requests.append({"path": url.path, "params": params, "headers": dict(self.headers)})
                    rows = sorted(api.missions.values(), key=lambda r: r["id"])
                if url.path != "/v1/missions":
                    self._send(404, {"error": "not found"})
                    return
                since = params.get("updated_since")
                rows = [r for r in rows if since is None or r["updated_at"] >= since]
                page = int(params.get("page", "1"))
                total_pages = -(-len(rows) // PAGE_SIZE)
                body = {
                    "data": rows[(page - 1) * PAGE_SIZE : page * PAGE_SIZE],
                    "meta": {"page": page, "total_pages": total_pages},
                }
                self._send(200, body)

            def _send(self, status: int, body: dict[str, Any]) -> None:
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return

        return Handler

    def requests_since(self, start: int) -> list[dict[str, Any]]:
        """The requests received after the first ``start`` ones."""
        with self.lock:
            return self.requests[start:]


@pytest.fixture
def partner_api() -> Iterator[PartnerApi]:
    """The partner API, served in a thread for the test."""
    api = PartnerApi()
    api.thread.start()
    try:
        yield api
    finally:
        api.server.shutdown()
        api.server.server_close()


def _example(base_url: str) -> dict[str, Any]:
    """The example declaration, pointed at ``base_url``."""
    raw = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    raw["source"]["base_url"] = base_url
    return raw


def _declaration(raw: dict[str, Any], directory: Path) -> PipelineDecl:
    """The declaration as the project reads it: ``raw`` written to ``<directory>/partner_api.yaml`` and loaded."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return load_declaration(path)


def _run(raw: dict[str, Any], warehouse: Warehouse, tmp_path: Path) -> dict[str, int]:
    """Load the declaration with the project's runner; the rows loaded per table."""
    decl = _declaration(raw, tmp_path / "pipelines-decl")
    run = run_pipeline(decl, warehouse, pipelines_dir=tmp_path / "pipelines")
    return {t.table: t.rows_loaded for t in run.tables}


@pytest.fixture(autouse=True)
def pseudonymisation_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example declares contact_email personal (hash): the key must be set."""
    monkeypatch.setenv("DATAMART__PII_HMAC_KEY", "rest-test-key")


def test_paginated_endpoint_is_loaded_whole_with_the_bearer_token(
    warehouse: Warehouse, partner_api: PartnerApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCES__PARTNER_API__TOKEN", TOKEN)

    assert _run(_example(partner_api.base_url), warehouse, tmp_path) == {"missions": 25}

    requests = partner_api.requests_since(0)
    assert [(r["path"], r["params"]["page"]) for r in requests] == [
        ("/v1/missions", "1"),
        ("/v1/missions", "2"),
        ("/v1/missions", "3"),
    ]
    assert {r["headers"]["Authorization"] for r in requests} == {f"Bearer {TOKEN}"}
    assert requests[0]["params"]["updated_since"] == "2024-01-01T00:00:00Z"  # the declared initial_value
    assert warehouse.query("SELECT count(*), count(DISTINCT id) FROM raw_partner_api.missions") == [(25, 25)]
    expected = hmac.new(b"rest-test-key", b"contact7@partner.example.org", hashlib.sha256).hexdigest()
    assert warehouse.query("SELECT contact_email FROM raw_partner_api.missions WHERE id = 7") == [(expected,)]


def test_second_run_asks_for_what_changed_and_merges_it(
    warehouse: Warehouse, partner_api: PartnerApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCES__PARTNER_API__TOKEN", TOKEN)
    raw = _example(partner_api.base_url)
    assert _run(raw, warehouse, tmp_path) == {"missions": 25}
    last_max = max(m["updated_at"] for m in partner_api.missions.values())

    with partner_api.lock:
        partner_api.missions[7].update(title="Mission 7 (renamed)", status="closed", updated_at="2025-02-01T09:00:00Z")
        partner_api.missions[26] = {
            "id": 26,
            "title": "Mission 26",
            "status": "published",
            "updated_at": "2025-02-01T10:00:00Z",
        }
    seen = len(partner_api.requests_since(0))
    assert _run(raw, warehouse, tmp_path) == {"missions": 2}  # mission 25 is re-sent (>= last max) and skipped

    second = partner_api.requests_since(seen)
    assert [r["params"]["updated_since"] for r in second] == [last_max]
    assert warehouse.query("SELECT count(*) FROM raw_partner_api.missions") == [(26,)]
    assert warehouse.query(
        "SELECT id, title, status FROM raw_partner_api.missions WHERE id IN (6, 7, 26) ORDER BY id"
    ) == [
        (6, "Mission 6", "published"),
        (7, "Mission 7 (renamed)", "closed"),
        (26, "Mission 26", "published"),
    ]

    seen = len(partner_api.requests_since(0))
    assert _run(raw, warehouse, tmp_path) == {"missions": 0}  # nothing changed: nothing loaded
    assert [r["params"]["updated_since"] for r in partner_api.requests_since(seen)] == ["2025-02-01T10:00:00Z"]


BASE = "https://api.example.org/v1"
ENDPOINT = {"path": "missions"}


@pytest.mark.parametrize(
    ("source", "tables", "message"),
    [
        ({"kind": "rest_api"}, {"missions": {"endpoint": ENDPOINT}}, "source.base_url: missing: write the API root"),
        (
            {"kind": "rest_api", "base_url": BASE, "auth": {"type": "oauth1"}},
            {"missions": {"endpoint": ENDPOINT}},
            "source.auth.type: 'oauth1' is not one of bearer, api_key, http_basic",
        ),
        (
            {"kind": "rest_api", "base_url": BASE, "auth": {"type": "bearer", "token": "abc123"}},
            {"missions": {"endpoint": ENDPOINT}},
            "source.auth.token: a secret is never written in the declaration: remove it and set SOURCES__BAD__TOKEN",
        ),
        (
            {"kind": "rest_api", "base_url": BASE, "auth": {"type": "http_basic", "password": "hunter2"}},
            {"missions": {"endpoint": ENDPOINT}},
            "source.auth.password: a secret is never written in the declaration: remove it and set "
            "SOURCES__BAD__PASSWORD",
        ),
        (
            {"kind": "rest_api", "base_url": BASE, "headers": {"Authorization": "Bearer abc123"}},
            {"missions": {"endpoint": ENDPOINT}},
            "source.headers.Authorization: looks like a credential written in the declaration",
        ),
        (
            {"kind": "rest_api", "base_url": BASE},
            {"missions": {"endpoint": {"path": "missions", "params": {"api_key": "abc123"}}}},
            "tables.missions.endpoint.params.api_key: looks like a credential",
        ),
        (
            {"kind": "rest_api", "base_url": BASE},
            {"missions": {"endpoint": {"params": {"per_page": 100}}}},
            "tables.missions.endpoint.path: missing: the path under base_url",
        ),
        (
            {"kind": "rest_api", "base_url": BASE},
            {"missions": {"write_disposition": "merge"}},
            "tables.missions.endpoint.path: missing",
        ),
        (
            {"kind": "rest_api", "base_url": BASE, "paginator": {"type": "page_numbers"}},
            {"missions": {"endpoint": ENDPOINT}},
            "source.paginator.type: 'page_numbers' is not one of page_number, offset",
        ),
        (
            {"kind": "rest_api", "base_url": BASE},
            {"missions": {"endpoint": {"path": "missions", "paginator": {"type": "page_number", "pages": 3}}}},
            "tables.missions.endpoint.paginator.pages: unknown key for paginator page_number",
        ),
        (
            {"kind": "rest_api", "base_url": BASE},
            {"missions": {"endpoint": {"path": "missions", "pagination": "page_number"}}},
            "tables.missions.endpoint.pagination: unknown endpoint key",
        ),
        (
            {"kind": "rest_api", "base_url": BASE},
            {"missions": {"endpoint": {"path": "missions", "incremental": {"start_param": "updated_since"}}}},
            "tables.missions.cursor: endpoint.incremental needs the record field to track",
        ),
        (
            {"kind": "rest_api", "base_url": BASE},
            {"missions": {"cursor": "updated_at", "endpoint": {"path": "m", "incremental": {"cursor_path": "x"}}}},
            "tables.missions.endpoint.incremental.cursor_path: write the record field to track as "
            "tables.missions.cursor",
        ),
        (
            {"kind": "rest_api", "base_url": BASE, "token_url": "x"},
            {"missions": {"endpoint": ENDPOINT}},
            "source.token_url: unknown key for a rest_api source",
        ),
    ],
)
def test_declaration_mistakes_name_file_and_key(
    tmp_path: Path, source: dict[str, Any], tables: dict[str, dict[str, Any]], message: str
) -> None:
    with pytest.raises(DeclarationError) as error:
        validate_rest_declaration(tmp_path / "bad.yaml", copy.deepcopy(source), copy.deepcopy(tables))
    assert str(error.value).startswith("bad.yaml: ")
    assert message in str(error.value)


def test_example_declaration_is_valid() -> None:
    raw = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    validate_rest_declaration(EXAMPLE, raw["source"], raw["tables"])


def test_missing_token_stops_before_any_request(partner_api: PartnerApi, tmp_path: Path) -> None:
    decl = _declaration(_example(partner_api.base_url), tmp_path / "decl")
    raw_tables = decl.raw_tables
    with pytest.raises(SettingsError, match=r"sources\.partner_api\.token: set SOURCES__PARTNER_API__TOKEN"):
        build_rest_resources(decl, list(decl.tables), raw_tables)
    assert partner_api.requests_since(0) == []


def test_base_url_from_config_when_not_in_the_file(
    partner_api: PartnerApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = _example(partner_api.base_url)
    del raw["source"]["base_url"]
    monkeypatch.setenv("SOURCES__PARTNER_API__BASE_URL", partner_api.base_url)
    monkeypatch.setenv("SOURCES__PARTNER_API__TOKEN", TOKEN)
    warehouse = Warehouse(target="duckdb", duckdb_path=tmp_path / "wh.duckdb")
    assert _run(raw, warehouse, tmp_path) == {"missions": 25}
