"""What the job writes under data/ and .dlt/ is private to its owner, whatever the umask it was started with."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

from datamart.settings import PROJECT_ROOT

PYTHON = sys.executable

# `python -m datamart run --demo` (what `make run` runs), with an audit hook that notes the mode of
# .dlt/secrets.toml at every audited event once it exists: a key readable by others even for an instant is seen.
RUN_WATCHING_SECRETS = textwrap.dedent(
    """
    import os, runpy, sys
    secrets = sys.argv[1]
    seen = []
    done = []
    def hook(event, args):
        if done:
            return
        try:
            mode = os.stat(secrets).st_mode & 0o777
        except OSError:
            return
        if not seen or seen[-1] != mode:
            seen.append(mode)
    sys.addaudithook(hook)
    sys.argv = ["datamart", "run", "--demo"]
    try:
        runpy.run_module("datamart", run_name="__main__", alter_sys=True)
    finally:
        done.append(True)
        print("secrets modes:", " ".join(oct(m) for m in seen), file=sys.stderr)
    """
)


def _open_to_others(root: Path) -> list[str]:
    """Every file or folder under ``root`` that a group member or another user could read, write or enter."""
    found = []
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            mode = stat.S_IMODE(path.lstat().st_mode)
            if mode & 0o077 and not path.is_symlink():
                found.append(f"{path.relative_to(root)} {oct(mode)}")
    return found


def test_make_run_writes_data_and_secrets_private_to_the_owner(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / ".dlt").mkdir(parents=True)
    shutil.copy(PROJECT_ROOT / ".dlt" / "config.toml", project / ".dlt" / "config.toml")
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DESTINATION__", "SOURCES__", "DATAMART"))}
    env.update(
        DLT_PROJECT_DIR=str(project),
        DLT_DATA_DIR=str(data / "dlt"),
        DATAMART_PIPELINES_DIR=str(data / "dlt" / "pipelines"),
        DESTINATION__DUCKDB__CREDENTIALS=str(data / "warehouse.duckdb"),
        SOURCES__APP_DB__CREDENTIALS=f"sqlite:///{data / 'demo' / 'app.sqlite'}",
        SOURCES__BUCKET__BUCKET_URL=str(data / "bucket"),
    )
    secrets = project / ".dlt" / "secrets.toml"
    result = subprocess.run(
        [PYTHON, "-c", RUN_WATCHING_SECRETS, str(secrets)],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=lambda: os.umask(0o022),  # the usual umask: files 0644, folders 0755 unless the job says
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "demo: wrote .dlt/secrets.toml" in result.stdout

    modes = next(line for line in result.stderr.splitlines() if line.startswith("secrets modes:"))
    assert modes == "secrets modes: 0o600", modes  # 0600 from its creation on, never anything else
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o600
    for made in ("warehouse.duckdb", "dlt/pipelines/duckdb/app_db", "demo/app.sqlite", "bucket"):
        assert (data / made).exists(), made
    assert _open_to_others(data) == []


def test_an_existing_data_folder_and_secrets_file_are_closed(tmp_path: Path) -> None:
    """Made by an earlier version or by hand (0755, 0644): the next command closes them."""
    project = tmp_path / "project"
    (project / ".dlt").mkdir(parents=True)
    secrets = project / ".dlt" / "secrets.toml"
    secrets.write_text('[datamart]\npii_hmac_key = "k"\n')
    secrets.chmod(0o644)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DESTINATION__", "DATAMART"))}
    env.update(DLT_PROJECT_DIR=str(project), DESTINATION__DUCKDB__CREDENTIALS=str(tmp_path / "w.duckdb"))
    result = subprocess.run(
        [PYTHON, "-m", "datamart", "env"], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o600
    data = PROJECT_ROOT / "data"
    if data.exists():
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
