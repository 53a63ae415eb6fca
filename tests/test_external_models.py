"""external_models.yaml is generated from the dlt pipelines' schemas, committed up to date, and follows the source."""

from __future__ import annotations

import dataclasses
import shutil
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from dlt.common.schema import Schema
from dlt.common.schema.utils import new_table

from datamart import external_models
from datamart.external_models import (
    DemoSource,
    ExternalModelsError,
    dlt_schemas_from_declarations,
    generate_demo_source,
    render_external_models,
    sqlmesh_type,
)
from datamart.ingest.declarations import PipelineDecl, load_named
from datamart.settings import DEMO_PIPELINES_DIR, PIPELINES_DIR
from datamart.testing.commands import DLT, PYTHON, environment, run

Schemas = list[tuple[PipelineDecl, Schema]]


@pytest.fixture(scope="module")
def schemas(tmp_path_factory: pytest.TempPathFactory) -> Schemas:
    """The dlt schemas of every declared pipeline, after a first run on a fresh demo source."""
    work = tmp_path_factory.mktemp("external-models")
    return dlt_schemas_from_declarations(generate_demo_source(work / "demo"), work)


@pytest.fixture(scope="module")
def rendered(schemas: Schemas) -> str:
    """The generated external_models.yaml text."""
    return render_external_models(schemas)


def _models(text: str) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in yaml.safe_load(text)}


def _command_env(tmp_path: Path, declarations: Path) -> dict[str, str]:
    """The environment of `python -m datamart.external_models` (and `dlt pipeline`) on a warehouse of the test."""
    return environment(
        DATAMART_DECLARATIONS_DIR=str(declarations),
        DATAMART_PIPELINES_DIR=str(tmp_path / "pipelines"),
        DESTINATION__DUCKDB__CREDENTIALS=str(tmp_path / "warehouse.duckdb"),
    )


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run(list(args), env)


def test_committed_file_is_a_fresh_generation(tmp_path: Path) -> None:
    """`make external-models`'s command with --check, on the project's own pipelines (pipelines/*.yaml)."""
    result = _run(_command_env(tmp_path, PIPELINES_DIR), PYTHON, "-m", "datamart.external_models", "--check")
    assert result.returncode == 0, f"external_models.yaml is stale: run `make external-models`\n{result.stdout}"


def test_a_pipeline_the_demo_cannot_feed_is_taken_from_its_last_run(tmp_path: Path) -> None:
    """A project adds its own pipeline: the demo ones still run on the demo, the new one comes from its own run."""
    declarations = tmp_path / "declarations"
    shutil.copytree(DEMO_PIPELINES_DIR, declarations)
    (declarations / "crm.yaml").write_text(
        "source: {kind: sql_database}\n"
        "dataset: raw_crm\n"
        "tables:\n"
        "  contacts:\n"
        "    write_disposition: merge\n"
        "    primary_key: id\n"
        "    cursor: updated_at\n"
        "    personal: {email: hash}\n",
        encoding="utf-8",
    )
    with sqlite3.connect(tmp_path / "crm.sqlite") as conn:
        conn.execute("CREATE TABLE contacts (id INTEGER PRIMARY KEY, email TEXT, score REAL, updated_at TIMESTAMP)")
        conn.execute("INSERT INTO contacts VALUES (1, 'a@example.org', 1.5, '2026-11-01 10:00:00')")
    env = _command_env(tmp_path, declarations)
    command = [PYTHON, "-m", "datamart.external_models", "--output", str(tmp_path / "out.yaml")]

    never_ran = _run(env, *command)
    assert never_ran.returncode == 2
    assert "pipeline(s) crm: not fed by the demo source" in never_ran.stderr
    assert "run `dlt pipeline <name> run` once" in never_ran.stderr

    env.update(SOURCES__CRM__CREDENTIALS=f"sqlite:///{tmp_path / 'crm.sqlite'}", DATAMART__PII_HMAC_KEY="k")
    loaded = _run(env, DLT, "pipeline", "crm", "run")
    assert loaded.returncode == 0, loaded.stderr
    result = _run(env, *command)
    assert result.returncode == 0, result.stderr
    models = _models((tmp_path / "out.yaml").read_text(encoding="utf-8"))
    assert list(models)[:2] == ["raw_app_db.organizations", "raw_app_db.missions"]  # the demo ones, from the demo
    assert models["raw_crm.contacts"]["columns"] == {
        "id": "bigint",
        "email": "text",
        "score": "double",
        "updated_at": "timestamp",
        "_dlt_load_id": "text",
    }
    assert models["raw_crm.contacts"]["column_descriptions"]["email"].startswith("Pseudonymised")


def test_a_changed_declaration_makes_the_committed_file_stale(schemas: Schemas) -> None:
    committed = external_models.EXTERNAL_MODELS_PATH.read_text(encoding="utf-8")
    app_db = next(decl for decl, _ in schemas if decl.name == "app_db")
    volunteers = app_db.table("volunteers")
    changed = dataclasses.replace(volunteers, personal={**volunteers.personal, "department": "hash"})
    changed_decl = dataclasses.replace(
        app_db, tables=tuple(changed if t.name == "volunteers" else t for t in app_db.tables)
    )
    text = render_external_models([(changed_decl if d is app_db else d, s) for d, s in schemas])

    assert text != committed
    department = _models(text)["raw_app_db.volunteers"]["column_descriptions"]["department"]
    assert department.startswith("Pseudonymised: keyed HMAC-SHA256 (hex) of the department")


def test_types_and_descriptions_follow_the_declarations(rendered: str) -> None:
    models = _models(rendered)
    assert list(models) == [
        "raw_app_db.organizations",
        "raw_app_db.missions",
        "raw_app_db.volunteers",
        "raw_app_db.applications",
        "raw_app_db.stats_events",
        "raw_bucket.partners",
        "raw_bucket.partner_reports",
        "ops.pipeline_runs",  # the run records (datamart/ingest/ops.py), read by marts.data_freshness_v1
        "ops.pipeline_run_tables",
        "ops.datamart_refreshes",  # the refreshes of the published views, read by marts.data_freshness_v1
        "ops.replication_slots",  # replication slots measured by each run, read by marts.data_freshness_v1
        "ops.deleted_rows",  # what the delete steps removed, read by marts.missions_v1 (incremental)
    ]
    volunteers = models["raw_app_db.volunteers"]
    assert volunteers["columns"] == {
        "id": "bigint",
        "email": "text",
        "department": "text",
        "created_at": "timestamp",
        "updated_at": "timestamp",
        "birth_year": "bigint",
        "_dlt_load_id": "text",
    }
    assert volunteers["column_descriptions"]["email"].startswith("Pseudonymised: keyed HMAC-SHA256 (hex) of the email")
    assert volunteers["column_descriptions"]["birth_year"].startswith("Year of birth_date")
    assert "never loaded (first_name, last_name, phone, postcode)" in volunteers["description"]
    assert "current state, deleted rows removed" in volunteers["description"]
    assert "append-only" in models["raw_app_db.stats_events"]["description"]
    assert models["raw_app_db.stats_events"]["columns"]["occurred_at"] == "timestamp"
    assert models["raw_app_db.missions"]["columns"]["start_date"] == "date"
    assert models["raw_bucket.partners"]["columns"]["active"] == "boolean"
    assert "rows deleted at the source are kept" in models["raw_bucket.partners"]["description"]
    # missions keep their history (history: scd2): the validity of each version is declared, its row hash is not
    missions = models["raw_app_db.missions"]
    assert list(missions["columns"])[-3:] == ["_dlt_load_id", "_dlt_valid_from", "_dlt_valid_to"]
    assert "_datamart_row_version" not in missions["columns"]
    assert "every version kept (history: scd2)" in missions["description"]
    assert missions["column_descriptions"]["_dlt_valid_to"].endswith("null: current.")
    for name, model in models.items():
        if name.startswith("ops.") or name == "raw_app_db.missions":
            continue  # written by our run records, not by dlt; the history table is checked above
        assert list(model["columns"])[-1] == "_dlt_load_id", name
        assert not [c for c in model["columns"] if c.startswith("_dlt_") and c != "_dlt_load_id"], name


def test_dlt_internal_columns_other_than_the_load_id_are_left_out() -> None:
    decl = load_named("app_db")
    schema = Schema("app_db")
    columns = [
        {"name": "id", "data_type": "bigint"},
        {"name": "email", "data_type": "text"},
        {"name": "score", "data_type": "decimal", "precision": 10, "scale": 2},
        {"name": "never_seen"},  # a hint without data: not a column of the warehouse table
        {"name": "_datamart_deleted_at", "data_type": "timestamp", "timezone": False},
        {"name": "_dlt_id", "data_type": "text"},
        {"name": "_dlt_load_id", "data_type": "text"},
    ]
    for table in decl.tables:
        schema.update_table(new_table(table.name, columns=columns))  # type: ignore[arg-type]
    model = _models(render_external_models([(decl, schema)]))["raw_app_db.volunteers"]
    assert model["columns"] == {"id": "bigint", "email": "text", "score": "decimal(10,2)", "_dlt_load_id": "text"}


def test_dlt_types_map_to_sqlmesh_types() -> None:
    assert sqlmesh_type({"data_type": "timestamp", "timezone": False}, "t") == "timestamp"
    assert sqlmesh_type({"data_type": "timestamp"}, "t") == "timestamptz"  # dlt's default is timezone-aware
    assert sqlmesh_type({"data_type": "decimal"}, "t") == "decimal(38,9)"
    assert sqlmesh_type({"data_type": "bigint", "precision": 32}, "t") == "integer"
    assert sqlmesh_type({"data_type": "binary"}, "t") == "blob"
    assert sqlmesh_type({"data_type": "json"}, "t") == "json"
    with pytest.raises(ExternalModelsError, match="t: dlt data type 'interval' has no SQLMesh mapping"):
        sqlmesh_type({"data_type": "interval"}, "t")


def test_a_new_source_column_appears_after_a_rerun(tmp_path: Path) -> None:
    source: DemoSource = generate_demo_source(tmp_path / "demo")
    with sqlite3.connect(source.source_url[len("sqlite:///") :]) as conn:
        conn.execute("ALTER TABLE missions ADD COLUMN remote_share DOUBLE")
        conn.execute("UPDATE missions SET remote_share = 0.5 WHERE id % 2 = 0")
    text = render_external_models(dlt_schemas_from_declarations(source, tmp_path, [load_named("app_db")]))

    columns = _models(text)["raw_app_db.missions"]["columns"]
    assert columns["remote_share"] == "double"
    data = [c for c in columns if c not in ("_dlt_valid_from", "_dlt_valid_to")]  # missions keep their history
    assert data[-2:] == ["remote_share", "_dlt_load_id"]


def test_check_prints_a_diff_and_fails_when_stale(
    rendered: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "external_models.yaml"
    target.write_text(rendered.replace("email: text", "email: varchar"), encoding="utf-8")
    monkeypatch.setattr(external_models, "PROJECT_ROOT", tmp_path)
    monkeypatch.setattr(external_models, "EXTERNAL_MODELS_PATH", target)
    monkeypatch.setattr(external_models, "generate_from_demo", lambda work_dir: rendered)
    monkeypatch.setattr(external_models, "configure_environment", lambda: None)  # keep the session's dlt dirs

    assert external_models.main(["--check"]) == 1
    out, err = capsys.readouterr()
    assert "-    email: varchar\n+    email: text\n" in out
    assert "external_models.yaml is stale; regenerate with `python -m datamart.external_models`" in err
    assert external_models.main([]) == 0
    assert target.read_text(encoding="utf-8") == rendered
    assert external_models.main(["--check"]) == 0
