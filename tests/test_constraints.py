"""Installs are the same everywhere: make install, CI and the job image install the versions of constraints.txt."""

from __future__ import annotations

import subprocess
import sys

from datamart.settings import PROJECT_ROOT
from datamart.testing.commands import MAKE_VARIABLES, environment


def _pinned() -> dict[str, str]:
    lines = (PROJECT_ROOT / "constraints.txt").read_text().splitlines()
    pins = [line.split("==") for line in lines if line and not line.startswith("#")]
    return {name.lower().replace("_", "-"): version for name, version in pins}


def test_this_venv_holds_exactly_the_constrained_versions() -> None:
    frozen = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    installed = dict(line.lower().replace("_", "-").split("==") for line in frozen if "==" in line)
    pinned = _pinned()
    differ = {name: (version, pinned.get(name)) for name, version in installed.items() if pinned.get(name) != version}
    assert not differ, f"installed (left) vs constraints.txt (right): {differ}; run make lock or make install"
    for package in ("dlt", "sqlmesh", "duckdb", "psycopg2-binary", "connectorx"):
        assert package in pinned


def test_make_install_and_the_image_use_the_constraints() -> None:
    env = environment(MAKE_VARIABLES)
    dry = subprocess.run(
        ["make", "--no-print-directory", "-n", "-B", "install"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert '-m pip install --quiet --quiet -c constraints.txt -e ".[dev]"' in dry
    dockerfile = (PROJECT_ROOT / "deploy" / "Dockerfile").read_text()
    assert "COPY pyproject.toml README.md constraints.txt ./" in dockerfile
    assert "pip install --no-cache-dir -c constraints.txt ." in dockerfile
