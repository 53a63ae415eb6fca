"""CI and production agree: one environment for every runner of a warehouse, and pull requests run lint and tests."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest
import yaml

from datamart.settings import PROJECT_ROOT
from datamart.testing.commands import MAKE_VARIABLES, PYTHON, environment, run

WORKFLOWS = PROJECT_ROOT / ".github" / "workflows"


def _workflow(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text(encoding="utf-8"))


def _triggers(workflow: dict) -> dict:
    return workflow.get("on", workflow.get(True)) or {}  # YAML 1.1 reads the key `on` as True


def _dag_environment() -> str | None:
    """The DATAMART_ENV the Airflow DAG gives its tasks when the worker sets none (read without Airflow)."""
    tree = ast.parse((PROJECT_ROOT / "dags" / "datamart_dag.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", None) == "setting"
            and [getattr(a, "value", None) for a in node.args[:1]] == ["DATAMART_ENV"]
        ):
            return node.args[1].value
    return None  # the DAG passes no DATAMART_ENV: the commands' default


def _runners() -> dict[str, str | None]:
    """DATAMART_ENV of each runner that uses the production warehouse (None: not set, the commands' default)."""
    cronjob = yaml.safe_load((PROJECT_ROOT / "deploy" / "k8s" / "cronjob.yaml").read_text(encoding="utf-8"))
    container = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    return {
        "promote.yml": _workflow("promote.yml")["jobs"]["promote"].get("env", {}).get("DATAMART_ENV"),
        "review.yml": _workflow("review.yml")["jobs"]["review"].get("env", {}).get("DATAMART_ENV"),
        "k8s CronJob": {e["name"]: e.get("value") for e in container["env"]}.get("DATAMART_ENV"),
        "Airflow DAG": _dag_environment(),
    }


@pytest.mark.postgres
def test_every_runner_of_the_warehouse_is_accepted_by_it(pg_database: str) -> None:
    """The promotion, the review, the CronJob and the Airflow tasks in turn on one warehouse: none is refused."""
    runners = _runners()
    base = environment(
        ("DESTINATION__", "DATAMART_", "PROD__", "DEV__"),
        DATAMART_TARGET="postgres",
        DESTINATION__POSTGRES__CREDENTIALS=pg_database,
    )
    for runner, selected in runners.items():
        env = dict(base, **({"DATAMART_ENV": selected} if selected else {}))
        result = run([PYTHON, "-m", "datamart", "query", "SELECT 1"], env, timeout=120)
        assert result.returncode == 0, f"{runner} (DATAMART_ENV={selected}) refused: {result.stderr}"
    assert set(runners.values()) == {"prod"}, runners


def test_pull_requests_run_lint_and_the_tests(tmp_path: Path) -> None:
    """A workflow on pull requests runs `make lint` and `make test`; `make lint` passes on this checkout."""
    checks = []
    for path in sorted(WORKFLOWS.glob("*.yml")):
        workflow = yaml.safe_load(path.read_text(encoding="utf-8"))
        if "pull_request" not in _triggers(workflow):
            continue
        for job in workflow["jobs"].values():
            runs = [step.get("run", "").strip() for step in job.get("steps", [])]
            if "make lint" in runs and "make test" in runs:
                checks.append(path.name)
    assert checks == ["ci.yml"], checks

    env = environment(MAKE_VARIABLES)
    env["DESTINATION__DUCKDB__CREDENTIALS"] = str(tmp_path / "warehouse.duckdb")  # SQLMesh's linter opens it
    lint = subprocess.run(
        ["make", "--no-print-directory", "lint"], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
