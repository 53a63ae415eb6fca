"""The README's quick start on a fresh copy of the project, with nothing set: `make run`'s command must work."""

from __future__ import annotations

import os
import re
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
    # the output as a person sees it on a terminal: stdout and stderr in the order written
    env["PYTHONUNBUFFERED"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "datamart", "run", "--demo"],
        cwd=copy,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-6000:]
    assert "demo: generating the demo source of pipeline(s) app_db, bucket" in result.stdout
    # quiet by default: the README's sample is the whole output, line for line (timings and paths aside), and the
    # libraries' own logs went to the file its last line names
    assert _shape(result.stdout, copy) == _shape(_readme_sample(), Path("/path/to/datamart"))
    log_file = copy / re.search(r"^Log: (\S+)", result.stdout, re.MULTILINE).group(1)
    logged = log_file.read_text()
    assert "INFO sqlmesh" in logged and "INFO dlt" in logged
    models = len(list((copy / "models").rglob("*.sql")))  # a first run builds every model of the project
    assert f"Models built: {models} " in result.stdout
    assert (copy / ".dlt" / "secrets.toml").stat().st_mode & 0o077 == 0
    with duckdb.connect(str(copy / "data" / "warehouse.duckdb"), read_only=True) as conn:
        assert conn.execute("SELECT count(*) FROM marts.missions_v1").fetchone()[0] > 0


def _readme_sample() -> str:
    """The README's sample output of `make run`: the first fenced block after the quick start's commands."""
    readme = (PROJECT_ROOT / "README.md").read_text()
    after_commands = readme.split("make test   #", 1)[1].split("\n```\n", 1)[1]  # past the commands' block
    return re.search(r"^```\n(.*?)^```$", after_commands, re.DOTALL | re.MULTILINE).group(1)


def _shape(output: str, root: Path) -> list[str]:
    """The lines of a run's output with what changes from run to run left out: durations, the project's path and
    the log file's time stamp."""
    text = output.replace(str(root), "<project>")
    text = re.sub(r"\d+\.\d+s\b", "<t>s", text)
    text = re.sub(r"run-\d{8}-\d{6}-\d+\.log", "run-<stamp>.log", text)
    return text.strip().splitlines()
