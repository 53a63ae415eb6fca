"""Privacy guarantees: lineage of personal columns to the marts, small-cell suppression, erasure, the register.

Lineage tests need no data: they load the SQLMesh project (or a changed copy of it). Suppression and erasure run the
whole flow on a small demo source into each warehouse (DuckDB file, PostgreSQL database), once per module.
"""

from __future__ import annotations

import gc
import io
import logging
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlmesh.utils.errors import PlanError

from datamart.__main__ import main
from datamart.flow import run_flow
from datamart.gate.lineage import check_published_lineage, violations
from datamart.grants import metabase_role_name
from datamart.ingest.personal import pseudonym
from datamart.privacy.cli import check_command
from datamart.privacy.erasure import find_traces
from datamart.privacy.register import REGISTER_PATH, render_register
from datamart.settings import PIPELINES_DIR, Warehouse
from datamart.testing.commands import PYTHON, demo_settings, environment, run, set_environment
from datamart.testing.privacy import OTHER, expected_volunteer_activity
from datamart.testing.project import copy_project, edit, failed_audits
from datamart.transform import published_views, sqlmesh_context

pytestmark = pytest.mark.slow  # end-to-end: whole demo builds through the commands

KEY = "privacy-test-key"
ACTIVITY = "models/marts/volunteer_activity_v1.sql"
RARE_DEPARTMENT = "48"  # Lozère: exactly 3 volunteers in the demo, whatever the scale


def _copy_project(tmp_path: Path) -> Path:
    """A copy of what SQLMesh reads (no unit tests: the changed models contradict them on purpose)."""
    return copy_project(tmp_path / "project")


def _context(tmp_path: Path, project: Path | None = None) -> Any:
    return sqlmesh_context(Warehouse(target="duckdb", duckdb_path=tmp_path / "lineage.duckdb"), project)


# --- lineage ---------------------------------------------------------------------------------------------------

# The volunteer's email pseudonym carried by staging and an intermediate model, then published by a mart.
PSEUDONYM_IN_STAGING = (
    "    birth_year,\n    department,\n    created_at,",
    "    birth_year,\n    department,\n    email,\n    created_at,",
)
PSEUDONYM_CLEANED = (
    "    UPPER(TRIM(department)) AS department,\n",
    "    UPPER(TRIM(department)) AS department,\n    email AS volunteer_pseudonym,\n",
)
PSEUDONYM_SELECTED = (
    "  department,\n  created_at::TIMESTAMP",
    "  department,\n  volunteer_pseudonym,\n  created_at::TIMESTAMP",
)
INTERMEDIATE = """MODEL (
  name intermediate.int_volunteer_pseudonyms,
  kind VIEW,
  grain volunteer_id,
  audits (not_null(columns := (volunteer_id)))
);

SELECT
  volunteer_id,
  department,
  volunteer_pseudonym AS pseudonym
FROM staging.stg_app_db__volunteers
"""
MART = """MODEL (
  name marts.volunteer_reach_v1,
  kind FULL,
  grain department,
  audits (not_null(columns := (department)))
);

WITH volunteers AS (
  SELECT
    department,
    pseudonym
  FROM intermediate.int_volunteer_pseudonyms
)
SELECT
  department,
  {column}
FROM volunteers
{group_by}
"""


def _project_publishing(tmp_path: Path, column: str, group_by: str = "") -> Path:
    project = _copy_project(tmp_path)
    staging = "models/staging/app_db/stg_app_db__volunteers.sql"
    for old, new in (PSEUDONYM_IN_STAGING, PSEUDONYM_CLEANED, PSEUDONYM_SELECTED):
        edit(project, staging, old, new)
    (project / "models/intermediate/int_volunteer_pseudonyms.sql").write_text(INTERMEDIATE)
    (project / "models/marts/volunteer_reach_v1.sql").write_text(MART.format(column=column, group_by=group_by))
    return project


def test_the_project_publishes_personal_data_only_where_allowed(tmp_path: Path) -> None:
    context = _context(tmp_path)
    findings = check_published_lineage(context)
    assert violations(findings) == []
    decade = [f for f in findings if (f.model, f.column) == ("marts.volunteer_activity_v1", "birth_decade")]
    assert [(f.source_column, f.allowed) for f in decade] == [("app_db.volunteers.birth_date", True)]
    assert "tags ('personal:birth_decade')" in decade[0].message
    out = io.StringIO()
    assert check_command(context, out) == 0, out.getvalue()


def test_a_published_pseudonym_fails_naming_model_column_and_source(tmp_path: Path) -> None:
    context = _context(tmp_path, _project_publishing(tmp_path, "pseudonym AS volunteer_pseudonym"))
    refused = violations(check_published_lineage(context))
    assert [(f.model, f.column, f.source_column) for f in refused] == [
        ("marts.volunteer_reach_v1", "volunteer_pseudonym", "app_db.volunteers.email")
    ]
    # through the intermediate model and staging, down to the raw column
    assert refused[0].path == (
        "marts.volunteer_reach_v1.volunteer_pseudonym",
        "intermediate.int_volunteer_pseudonyms.pseudonym",
        "staging.stg_app_db__volunteers.volunteer_pseudonym",
        "raw_app_db.volunteers.email",
    )
    out = io.StringIO()
    assert check_command(context, out) == 1
    assert "FAIL marts.volunteer_reach_v1.volunteer_pseudonym derives from personal column app_db.volunteers.email" in (
        out.getvalue()
    )


def test_a_count_of_distinct_pseudonyms_passes(tmp_path: Path) -> None:
    project = _project_publishing(tmp_path, "COUNT(DISTINCT pseudonym) AS volunteers", "GROUP BY\n  department")
    findings = check_published_lineage(_context(tmp_path, project))
    reach = [f for f in findings if f.model == "marts.volunteer_reach_v1"]
    assert [(f.column, f.source_column, f.allowed) for f in reach] == [("volunteers", "app_db.volunteers.email", True)]
    assert "only counted" in reach[0].message
    assert violations(findings) == []


# A mart a team would write: counts of distinct volunteers per department, every convention but small cells kept.
COUNTING_MART = """MODEL (
  name marts.volunteers_per_department_v1,
  kind FULL,
  grain department,
  audits (not_null(columns := (department)), assert_no_personal_columns{small_cells}),
  description 'How many volunteers live in each department, one row per department. Answers: where do they live?',
  column_descriptions (
    department = 'Department code where the volunteers live.',
    volunteers = 'Volunteers signed up on the platform.'
  )
);

SELECT
  department,
  COUNT(DISTINCT volunteer_id) AS volunteers
FROM staging.stg_app_db__volunteers
GROUP BY
  department
"""


def test_a_count_of_people_without_small_cell_suppression_is_refused_by_plain_sqlmesh(tmp_path: Path) -> None:
    """Whoever writes the mart, a count of people is refused unless the model suppresses small cells (its audit
    assert_no_small_cells fails any group under the threshold): `sqlmesh lint`, and so every `sqlmesh plan`."""
    project = _copy_project(tmp_path)
    mart = project / "models/marts/volunteers_per_department_v1.sql"
    mart.write_text(COUNTING_MART.format(small_cells=""))
    env = environment(DESTINATION__DUCKDB__CREDENTIALS=str(tmp_path / "lint.duckdb"))
    refused = run([str(Path(PYTHON).parent / "sqlmesh"), "-p", str(project), "lint"], env, timeout=600)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    output = " ".join((refused.stdout + refused.stderr).split())
    assert "[Small cells] marts.volunteers_per_department_v1 counts people: COUNT(DISTINCT volunteer_id) over" in (
        output
    ), output
    mart.write_text(COUNTING_MART.format(small_cells=", assert_no_small_cells(people := volunteers)"))
    accepted = run([str(Path(PYTHON).parent / "sqlmesh"), "-p", str(project), "lint"], env, timeout=600)
    assert "Small cells" not in accepted.stdout + accepted.stderr, accepted.stdout + accepted.stderr


def test_other_aggregates_and_undeclared_uses_are_refused(tmp_path: Path) -> None:
    project = _project_publishing(tmp_path, "MAX(pseudonym) AS last_pseudonym", "GROUP BY\n  department")
    # and the birth decade without its declaration
    edit(project, ACTIVITY, "  tags (\n    'personal:birth_decade'\n  ),\n", "")
    refused = violations(check_published_lineage(_context(tmp_path, project)))
    assert sorted((f.model, f.column, f.source_column) for f in refused) == [
        ("marts.volunteer_activity_v1", "birth_decade", "app_db.volunteers.birth_date"),
        ("marts.volunteer_reach_v1", "last_pseudonym", "app_db.volunteers.email"),
    ]


def test_the_register_is_up_to_date(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATAMART_DECLARATIONS_DIR", str(PIPELINES_DIR))  # the project's register: its own pipelines
    expected = render_register(_context(tmp_path), metabase_role_name())
    assert REGISTER_PATH.read_text(encoding="utf-8") == expected, "stale: run `make privacy-register` and commit it"
    assert "| `app_db.volunteers.email` | hash:" in expected
    assert "`marts.volunteer_activity_v1.birth_decade` (declared `personal:birth_decade`)" in expected


# --- small cells and erasure, on data ---------------------------------------------------------------------------


@dataclass
class Flow:
    """A demo source (SQLite), a warehouse with the flow run on it, and where dlt keeps its working dirs."""

    warehouse: Warehouse
    source_path: Path
    pipelines_dir: Path
    tmp: Path

    def source(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run a statement on the source; rows."""
        with sqlite3.connect(self.source_path) as conn:
            return conn.execute(statement, params).fetchall()

    def run(self) -> None:
        """The whole job again (pipelines, then the prod plan)."""
        run_flow(self.warehouse, pipelines_dir=self.pipelines_dir, out=io.StringIO())


@pytest.fixture(scope="module", params=["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def flow(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, fresh_warehouse: Any
) -> Iterator[Flow]:
    """The whole flow run once per warehouse on a small demo source (scale 0.1)."""
    tmp = tmp_path_factory.mktemp(f"privacy-{request.param}")
    with fresh_warehouse(request.param, tmp, "t_privacy") as warehouse, pytest.MonkeyPatch.context() as mp:
        set_environment(mp, demo_settings(tmp, KEY, warehouse, scale=0.1))
        state = Flow(warehouse, tmp / "app.sqlite", tmp / "pipelines" / warehouse.target, tmp)
        state.run()
        yield state


def test_small_groups_are_merged_in_every_published_aggregate(flow: Flow) -> None:
    rare = flow.source("SELECT count(*) FROM volunteers WHERE department = ?", (RARE_DEPARTMENT,))[0][0]
    assert rare == 3
    context = sqlmesh_context(flow.warehouse)
    try:
        views = published_views(context)
        counting_people = [
            m for m in context.models.values() if any(name == "assert_no_small_cells" for name, _ in m.audits)
        ]
    finally:
        context.close()
    assert [m.name for m in counting_people] == ["marts.volunteer_activity_v1"]
    for view in views:
        has_department = flow.warehouse.query(
            "SELECT count(*) FROM information_schema.columns WHERE table_schema = 'marts' "
            f"AND table_name = '{view.split('.')[1]}' AND column_name = 'department'"
        )[0][0]
        if has_department:
            shown = flow.warehouse.query(f"SELECT count(*) FROM {view} WHERE department = '{RARE_DEPARTMENT}'")[0][0]
            assert shown == 0, f"{view} shows department {RARE_DEPARTMENT}"
    expected = expected_volunteer_activity(
        flow.source("SELECT id, department, birth_date FROM volunteers"),
        [r[0] for r in flow.source("SELECT volunteer_id FROM applications")],
    )
    rows = flow.warehouse.query(
        "SELECT department, birth_decade, volunteers, volunteers_who_applied, applications "
        "FROM marts.volunteer_activity_v1"
    )
    actual = {(d, None if b is None else int(b)): (int(v), int(w), int(a)) for d, b, v, w, a in rows}
    assert actual == expected
    assert (OTHER, None) in actual, "the small groups, Lozère's among them, are merged into 'other'"
    assert min(v for v, _, _ in actual.values()) >= 5


def test_the_audit_fails_when_the_macro_is_removed(flow: Flow, caplog: pytest.LogCaptureFixture) -> None:
    project = _copy_project(flow.tmp / f"no-macro-{uuid.uuid4().hex[:6]}")
    edit(project, ACTIVITY, "@merge_small_cell(volunteers, department, 'other')", "department")
    edit(project, ACTIVITY, "@merge_small_cell(volunteers, birth_decade, NULL)", "birth_decade")
    edit(project, ACTIVITY, "  HAVING\n    SUM(volunteers) >= @small_cell_threshold()\n", "")
    context = sqlmesh_context(flow.warehouse, project)
    caplog.set_level(logging.INFO, logger="sqlmesh")
    try:
        with pytest.raises(PlanError, match="Plan application failed"):
            context.plan("nomacro", auto_apply=True, no_prompts=True, skip_tests=True)
    finally:
        context.close()
    assert "assert_no_small_cells" in failed_audits(caplog.records)


def _traces(flow: Flow, volunteer_id: int, email: str) -> list[str]:
    traces = find_traces(
        flow.warehouse, "app_db", "volunteers", str(volunteer_id), {"email": email}, pipelines_dir=flow.pipelines_dir
    )
    return [t.format() for t in traces]


def _erased_command(
    flow: Flow, volunteer_id: int, email: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    """``python -m datamart privacy erased app_db volunteers <id> --value email=<email>``: exit code and output."""
    if flow.warehouse.target == "duckdb":
        monkeypatch.setenv("DESTINATION__DUCKDB__CREDENTIALS", str(flow.warehouse.duckdb_path))
    else:
        monkeypatch.setenv("DESTINATION__POSTGRES__CREDENTIALS", flow.warehouse.pg.to_native_representation())
    monkeypatch.setenv("DATAMART_TARGET", flow.warehouse.target)
    capsys.readouterr()
    code = main(["privacy", "erased", "app_db", "volunteers", str(volunteer_id), "--value", f"email={email}"])
    return code, capsys.readouterr().out


def test_an_erased_volunteer_leaves_no_trace_even_after_a_schema_change(
    flow: Flow, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    volunteer_id, email = flow.source(
        "SELECT v.id, v.email FROM volunteers v JOIN applications a ON a.volunteer_id = v.id "
        "GROUP BY v.id, v.email ORDER BY count(*) DESC, v.id LIMIT 1"
    )[0]
    hashed = pseudonym(KEY.encode(), email)
    before = _traces(flow, volunteer_id, email)
    where = {t.split(":")[0] for t in before}
    for place in (
        "raw_app_db.volunteers",
        "raw_app_db.applications",
        "staging.stg_app_db__volunteers",
        "staging.stg_app_db__applications",
        "intermediate.int_volunteer_applications",
    ):
        assert place in where, f"{place} not searched or empty before erasure: {before}"
    assert any("pseudonym of volunteers.email" in t for t in before)
    code, output = _erased_command(flow, volunteer_id, email, monkeypatch, capsys)
    assert code == 1
    assert f"NOT erased: {len(before)} trace(s) of app_db.volunteers key {volunteer_id}, email pseudonym" in output
    assert f"raw_app_db.volunteers: source key volunteers.id = {volunteer_id} in column id (1 row(s))" in output

    # A schema change first: new source columns in both tables, the volunteer's rows changed and reloaded.
    flow.source("ALTER TABLE volunteers ADD COLUMN nickname TEXT")
    flow.source("ALTER TABLE applications ADD COLUMN channel TEXT")
    flow.source(
        "UPDATE volunteers SET nickname = 'vol', updated_at = '2026-06-01 00:00:00' WHERE id = ?", (volunteer_id,)
    )
    flow.source(
        "UPDATE applications SET channel = 'web', updated_at = '2026-06-01 00:00:00' WHERE volunteer_id = ?",
        (volunteer_id,),
    )
    flow.run()
    assert flow.warehouse.query(
        "SELECT count(*) FROM information_schema.columns WHERE table_schema = 'raw_app_db' "
        "AND table_name = 'applications' AND column_name = 'channel'"
    ) == [(1,)]

    # The erasure request: the volunteer and their applications are deleted in the source.
    flow.source("DELETE FROM applications WHERE volunteer_id = ?", (volunteer_id,))
    flow.source("DELETE FROM volunteers WHERE id = ?", (volunteer_id,))
    flow.run()

    remaining = _traces(flow, volunteer_id, email)
    assert not remaining, "\n".join(remaining)
    code, output = _erased_command(flow, volunteer_id, email, monkeypatch, capsys)
    assert (code, output.split(" in ")[0]) == (
        0,
        f"erased: no trace of app_db.volunteers key {volunteer_id}, email pseudonym",
    )
    # what the check relies on, asserted directly
    assert flow.warehouse.query(f"SELECT count(*) FROM raw_app_db.volunteers WHERE id = {volunteer_id}") == [(0,)]
    assert flow.warehouse.query(
        f"SELECT count(*) FROM raw_app_db.applications WHERE volunteer_id = {volunteer_id}"
    ) == [(0,)]
    assert flow.warehouse.query(
        f"SELECT count(*) FROM intermediate.int_volunteer_applications WHERE volunteer_id = {volunteer_id}"
    ) == [(0,)]
    assert flow.warehouse.table_exists("raw_app_db_staging", "volunteers"), "dlt's merge staging was used"
    assert flow.warehouse.query("SELECT count(*) FROM raw_app_db_staging.volunteers") == [(0,)]
    assert not [p for p in flow.pipelines_dir.rglob("*_jobs/*") if p.is_file()], "loaded job files were deleted"
    assert flow.warehouse.query(f"SELECT count(*) FROM raw_app_db.volunteers WHERE email = '{hashed}'") == [(0,)]
    # the published aggregate counts one volunteer less, exactly as the source now says
    expected = expected_volunteer_activity(
        flow.source("SELECT id, department, birth_date FROM volunteers"),
        [r[0] for r in flow.source("SELECT volunteer_id FROM applications")],
    )
    rows = flow.warehouse.query("SELECT department, birth_decade, volunteers FROM marts.volunteer_activity_v1")
    assert {(d, None if b is None else int(b)): int(v) for d, b, v in rows} == {c: v[0] for c, v in expected.items()}


def _release_duckdb() -> None:
    """DuckDB has one writer per file: close the adapters SQLMesh keeps per file in this process (its cache)."""
    from sqlmesh.core.config.connection import BaseDuckDBConnectionConfig

    for adapter in BaseDuckDBConnectionConfig._data_file_to_adapter.values():
        adapter.close()
    BaseDuckDBConnectionConfig._data_file_to_adapter.clear()
    gc.collect()


def _schemas(flow: Flow) -> set[str]:
    return {r[0] for r in flow.warehouse.query("SELECT schema_name FROM information_schema.schemata")}


def test_an_erasure_reaches_the_review_environments(
    flow: Flow, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Review environments (`make review`'s pr_*) hold views, or tables of their own: the scheduled run's
    `environments` step removes those of merged pull requests and those holding a copy, so an erasure reaches them."""
    # a merged pull request: its environment serves prod's versions
    context = sqlmesh_context(flow.warehouse)
    try:
        context.plan("pr_main", auto_apply=True, no_prompts=True, skip_tests=True, include_unmodified=True)
    finally:
        context.close()
    # an open one that materialises the per-volunteer model: a table of its own, not refreshed by the scheduled run
    project = _copy_project(flow.tmp / f"pr-{uuid.uuid4().hex[:6]}")
    edit(project, "models/intermediate/int_volunteer_applications.sql", "kind VIEW,", "kind FULL,")
    context = sqlmesh_context(flow.warehouse, project)
    try:
        context.plan("pr_materialise", auto_apply=True, no_prompts=True, skip_tests=True)
    finally:
        context.close()
    assert {"staging__pr_main", "intermediate__pr_materialise"} <= _schemas(flow)

    volunteer_id, email = flow.source(
        "SELECT v.id, v.email FROM volunteers v JOIN applications a ON a.volunteer_id = v.id "
        "GROUP BY v.id, v.email ORDER BY count(*) DESC, v.id LIMIT 1"
    )[0]
    flow.source("DELETE FROM applications WHERE volunteer_id = ?", (volunteer_id,))
    flow.source("DELETE FROM volunteers WHERE id = ?", (volunteer_id,))
    flow.run()
    code, output = _erased_command(flow, volunteer_id, email, monkeypatch, capsys)
    assert code == 1 and "intermediate__pr_materialise.int_volunteer_applications" in output, output

    env = environment(("DESTINATION__", "DATAMART_TARGET"), **flow.warehouse.environment_variables())
    _release_duckdb()
    scheduled = run([PYTHON, "-m", "datamart", "scheduled", "--only", "environments", "--no-alert"], env)
    assert scheduled.returncode == 0, scheduled.stdout + scheduled.stderr
    assert "pr_main (merged: every version is prod's)" in scheduled.stdout
    assert "pr_materialise (holds its own copy of int_volunteer_applications" in scheduled.stdout
    assert not {s for s in _schemas(flow) if "__pr_" in s}, "the review environments' schemas were dropped"

    code, output = _erased_command(flow, volunteer_id, email, monkeypatch, capsys)
    assert (code, output.split(" in ")[0]) == (
        0,
        f"erased: no trace of app_db.volunteers key {volunteer_id}, email pseudonym",
    )
    assert flow.warehouse.query("SELECT count(*) FROM marts.missions_v1")[0][0] > 0  # prod untouched
