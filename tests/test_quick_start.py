"""The README's quick start on a fresh copy of the project, with nothing set: `make run`'s command must work."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from datamart.settings import PROJECT_ROOT

pytestmark = pytest.mark.slow  # end-to-end: whole demo builds through the commands

LEFT_OUT = (
    ".git",
    ".venv",
    "data",
    ".cache",
    "logs",
    ".pytest_cache",
    "__pycache__",
    "*.egg-info",
    ".dlt/secrets.toml",
)


def test_make_runs_command_works_on_a_fresh_copy_with_nothing_set(tmp_path: Path) -> None:
    copy = tmp_path / "datamart"
    shutil.copytree(PROJECT_ROOT, copy, ignore=shutil.ignore_patterns(*LEFT_OUT))
    (copy / ".dlt" / "secrets.toml").unlink(missing_ok=True)
    # no warehouse, source, key or dlt folder from the caller: what a new user has after `git clone`
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DESTINATION__", "SOURCES__", "DATAMART", "DLT_", "PROD__", "DEV__", "PREPROD__"))
    }
    # `python -m datamart` from the copy imports the copy's package: its PROJECT_ROOT is the copy
    result = subprocess.run(
        [sys.executable, "-m", "datamart", "run", "--demo"],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "demo: generating the demo source of pipeline(s) app_db, bucket" in result.stdout
    models = len(list((copy / "models").rglob("*.sql")))  # a first run builds every model of the project
    assert f"Models built: {models} " in result.stdout
    assert (copy / ".dlt" / "secrets.toml").stat().st_mode & 0o077 == 0
    with duckdb.connect(str(copy / "data" / "warehouse.duckdb"), read_only=True) as conn:
        assert conn.execute("SELECT count(*) FROM marts.missions_v1").fetchone()[0] > 0
