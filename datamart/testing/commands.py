"""Commands run as a user types them: an environment holding only what the test gives, the venv's executables, and
the demo source and warehouse handed over the dlt way (``SOURCES__…``, ``DESTINATION__…``).

One place for what the test files used to build each its own way: the caller's settings left out (a developer's own
warehouse or key must never reach a test's command), a dlt project folder with the committed ``config.toml`` only,
and a subprocess run from the project root with its output captured.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from datamart import demo
from datamart.settings import PROJECT_ROOT, Warehouse

if TYPE_CHECKING:
    import pytest

BIN = Path(sys.executable).parent
DLT = str(BIN / "dlt")
SQLMESH = str(BIN / "sqlmesh")
PYTHON = sys.executable

#: A caller's warehouse, sources and datamart settings (its key, target, folders): never passed to a test's command.
CALLER_SETTINGS = ("DESTINATION__", "SOURCES__", "DATAMART")
#: The same, and the environment-scoped credentials (``PROD__…``) and SQLMesh settings a caller may hold.
ALL_CALLER_SETTINGS = (*CALLER_SETTINGS, "SQLMESH__", "PROD__", "DEV__", "PREPROD__")
#: What an outer `make` exports: a `make` run by a test would take the outer one's flags (e.g. ``-n``).
MAKE_VARIABLES = ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")


def environment(without: tuple[str, ...] = CALLER_SETTINGS, **settings: str) -> dict[str, str]:
    """This process's environment less every variable whose name starts with one of ``without``, plus ``settings``."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(without)}
    env.update(settings)
    return env


def demo_settings(
    tmp: Path, key: str, warehouse: Warehouse | None = None, scale: float | None = None
) -> dict[str, str]:
    """The demo's ``app_db`` (SQLite) and bucket in ``tmp``, the PII key, dlt's pipelines folder in ``tmp`` and, when
    given, the warehouse as a user sets it. ``scale``: generate the demo source there first."""
    source_url = f"sqlite:///{tmp / 'app.sqlite'}"
    if scale is not None:
        demo.generate(source_url=source_url, bucket=tmp / "bucket", scale=scale)
    settings = {
        "SOURCES__APP_DB__CREDENTIALS": source_url,
        "SOURCES__BUCKET__BUCKET_URL": str(tmp / "bucket"),
        "DATAMART__PII_HMAC_KEY": key,
        "DATAMART_PIPELINES_DIR": str(tmp / "pipelines"),
    }
    if warehouse is not None:
        settings.update(warehouse.environment_variables())
    return settings


def set_environment(monkeypatch: pytest.MonkeyPatch, settings: Mapping[str, str]) -> None:
    """Each setting in this process's environment, undone by ``monkeypatch`` after the test (SQLMesh's config and
    dlt's resolution in this process read them there)."""
    for name, value in settings.items():
        monkeypatch.setenv(name, value)


def dlt_project(tmp: Path, name: str = "dlt_project") -> Path:
    """A dlt project folder ``tmp/name`` holding a copy of the committed ``.dlt/config.toml`` only (no secrets):
    point ``DLT_PROJECT_DIR`` at it."""
    project = tmp / name
    (project / ".dlt").mkdir(parents=True, exist_ok=True)
    shutil.copy(PROJECT_ROOT / ".dlt" / "config.toml", project / ".dlt" / "config.toml")
    return project


def clone_environment(
    tmp: Path, without: tuple[str, ...] = ALL_CALLER_SETTINGS, project: str = "dlt_project", **settings: str
) -> dict[str, str]:
    """What a user has after `git clone`, pointed at ``tmp``: no caller setting, dlt reading a copy of the committed
    config.toml (``tmp/project``), dlt's pipelines and the demo's source and bucket in ``tmp``, and ``settings``. No PII
    key unless ``settings`` gives one: `make run` writes its own."""
    return environment(
        without,
        DLT_PROJECT_DIR=str(dlt_project(tmp, project)),
        DATAMART_PIPELINES_DIR=str(tmp / "pipelines"),
        SOURCES__BUCKET__BUCKET_URL=str(tmp / "bucket"),
        SOURCES__APP_DB__CREDENTIALS=f"sqlite:///{tmp / 'app.sqlite'}",
        **settings,
    )


def sqlite_path(url: str) -> str:
    """The file of a ``sqlite:///…`` URL."""
    assert url.startswith("sqlite:///"), url
    return url[len("sqlite:///") :]


def run(
    command: list[str],
    env: Mapping[str, str],
    *,
    timeout: float = 600,
    cwd: Path = PROJECT_ROOT,
    expect: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """``command`` from ``cwd`` (the project root), output captured as text; its exit code checked when ``expect``."""
    result = subprocess.run(command, env=dict(env), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if expect is not None:
        assert result.returncode == expect, (
            f"{' '.join(command)}: exit {result.returncode}, not {expect}\n{result.stdout}\n{result.stderr}"
        )
    return result


def dlt(env: Mapping[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """The venv's ``dlt <args>`` from the project root, as a user types it."""
    return run([DLT, *args], env, timeout=timeout)
