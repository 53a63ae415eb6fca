"""A project with pipelines of its own: `make run` runs what is declared and generates the demo only for the demo's."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import duckdb
import pytest

from datamart import demo
from datamart.settings import DEMO_PIPELINES_DIR, PROJECT_ROOT

pytestmark = pytest.mark.slow  # `make run` on a copy of the project: whole builds


def test_make_run_with_the_demo_app_db_replaced_by_an_own_pipeline(tmp_path: Path) -> None:
    # the project replaced the demo's app_db by its own pipeline `platform` (same tables, into the same dataset, so
    # the models stay valid), reading its own database; it kept the demo's bucket
    declarations = tmp_path / "pipelines"
    declarations.mkdir()
    shutil.copy(DEMO_PIPELINES_DIR / "bucket.yaml", declarations / "bucket.yaml")
    own = (DEMO_PIPELINES_DIR / "app_db.yaml").read_text(encoding="utf-8")
    own = own.replace("name: app_db", "name: platform").replace("\ndemo: true", "\ndemo: false")
    (declarations / "platform.yaml").write_text(own, encoding="utf-8")
    platform = tmp_path / "platform.sqlite"
    demo.generate(source_url=f"sqlite:///{platform}", bucket=tmp_path / "unused-bucket")
    with sqlite3.connect(platform) as conn:
        conn.execute("UPDATE volunteers SET department = 'own' WHERE id = 1")  # a row only the own source has
    project = tmp_path / "project"
    (project / ".dlt").mkdir(parents=True)
    shutil.copy(PROJECT_ROOT / ".dlt" / "config.toml", project / ".dlt" / "config.toml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DESTINATION__", "SOURCES__", "DATAMART"))}
    env.update(
        DATAMART_DECLARATIONS_DIR=str(declarations),
        DLT_PROJECT_DIR=str(project),
        DATAMART_PIPELINES_DIR=str(tmp_path / "dlt"),
        DESTINATION__DUCKDB__CREDENTIALS=str(tmp_path / "warehouse.duckdb"),
        SOURCES__PLATFORM__CREDENTIALS=f"sqlite:///{platform}",
        SOURCES__BUCKET__BUCKET_URL=str(tmp_path / "bucket"),
        # where the demo's app_db would be generated if it still were: it must not be
        SOURCES__APP_DB__CREDENTIALS=f"sqlite:///{tmp_path / 'demo-app.sqlite'}",
    )
    result = subprocess.run(
        ["make", "--no-print-directory", "run"], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "demo: generating the demo source of pipeline(s) bucket" in result.stdout
    assert "loading pipeline platform → raw_app_db" in result.stdout
    assert "loading pipeline bucket → raw_bucket" in result.stdout
    assert not (tmp_path / "demo-app.sqlite").exists()
    assert (tmp_path / "bucket" / "referentials" / "partners.csv").exists()
    with duckdb.connect(str(tmp_path / "warehouse.duckdb"), read_only=True) as conn:
        assert conn.execute("SELECT department FROM raw_app_db.volunteers WHERE id = 1").fetchall() == [("own",)]
        assert conn.execute("SELECT count(*) FROM marts.missions_v1").fetchone()[0] > 0
