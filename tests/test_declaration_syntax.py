"""A declaration that is not valid YAML (an unclosed ``{``) stops every entry point the same way as any other
declaration error: exit 2, one line naming the file, the line and the key, no traceback; the scheduled run also
prints its result line and alerts. Real commands as subprocesses, on a DuckDB warehouse (nothing is read or loaded:
the declarations are checked first)."""

from __future__ import annotations

import http.server
import json
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from datamart.settings import DEMO_PIPELINES_DIR
from datamart.testing.commands import DLT, PYTHON, clone_environment, run

#: The demo's app_db.yaml with the `{` of tables.missions.deletes never closed (line 25 of the file).
BROKEN_LINE = "    deletes: {soft: deleted_at, hard: key_set}"


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A copy of the demo's declarations where app_db.yaml has an unclosed ``{``; and that line's number."""
    folder = tmp_path_factory.mktemp("declarations")
    for path in DEMO_PIPELINES_DIR.glob("*.yaml"):
        shutil.copy(path, folder / path.name)
    lines = (folder / "app_db.yaml").read_text(encoding="utf-8").splitlines()
    number = next(i for i, line in enumerate(lines) if line.startswith(BROKEN_LINE))
    lines[number] = lines[number].replace("key_set}", "key_set", 1)
    (folder / "app_db.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder, number + 1


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[str]]]:
    """A local HTTP server standing for the chat webhook: (its URL, the alert texts received)."""
    received: list[str] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["text"])
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hooks/Tok{uuid.uuid4().hex}", received
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "command",
    [
        [DLT, "pipeline", "app_db", "run"],
        [DLT, "pipeline", "app_db", "verify"],
        [PYTHON, "-m", "datamart", "run"],
        [PYTHON, "-m", "datamart", "scheduled"],
    ],
    ids=["dlt-run", "dlt-verify", "datamart-run", "datamart-scheduled"],
)
def test_a_yaml_syntax_error_is_one_line_naming_file_line_and_key(
    command: list[str], broken: tuple[Path, int], webhook: tuple[str, list[str]], tmp_path: Path
) -> None:
    folder, line = broken
    url, alerts = webhook
    env = clone_environment(
        tmp_path,
        DATAMART_DECLARATIONS_DIR=str(folder),
        DESTINATION__DUCKDB__CREDENTIALS=str(tmp_path / "warehouse.duckdb"),
        DATAMART__PII_HMAC_KEY="Hmac-Key-" + uuid.uuid4().hex,
        DATAMART__ALERT_WEBHOOK_URL=url,
    )
    result = run(command, env, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output and "<unicode string>" not in output, output
    errors = [text for text in output.splitlines() if "app_db.yaml" in text]
    assert len(errors) == 1, output
    assert errors[0].startswith(f"error: app_db.yaml: line {line}: tables.missions.deletes: not valid YAML: "), output
    assert "expected ',' or '}'" in errors[0]
    if command[-1] == "scheduled":
        assert "result: FAILED before any step, alert posted to the webhook" in result.stderr, output
        assert len(alerts) == 1 and f"app_db.yaml: line {line}: tables.missions.deletes" in alerts[0], alerts
