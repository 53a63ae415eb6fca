"""`make review` on both warehouses: the contract of the published views, the report, and promotion's same gate.

Prod is built once per warehouse from a small demo (module-scoped); each case is a pull request simulated in a
temporary copy of the SQLMesh project with one model edited, reviewed with `python -m datamart review` in its own
SQLMesh environment. Expected figures are computed with plain SQL on the warehouse, never from the report itself.
"""

from __future__ import annotations

import io
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from datamart.__main__ import main
from datamart.flow import run_flow
from datamart.gate.checks import GateError, gate_input, run_checks
from datamart.review.run import DEFAULT_OUTPUT
from datamart.settings import PROJECT_ROOT, Warehouse
from datamart.testing.commands import demo_settings, set_environment
from datamart.testing.project import copy_project, edit
from datamart.testing.views import view_checksum
from datamart.transform import apply_prod, sqlmesh_context

pytestmark = pytest.mark.slow

MISSIONS = "models/marts/missions_v1.sql"
CONTRACT = "## Contract of the published views"
PERSONAL_MART = "models/marts/volunteer_keys_v1.sql"
VOLUNTEER_KEYS_MART = """MODEL (
  name marts.volunteer_keys_v1,
  kind VIEW,
  audits (
    not_null(columns := (volunteer_id))
  ),
  description 'One row per volunteer (a pull request that should be refused).',
  column_descriptions (
    volunteer_id = 'Identifier of the volunteer.',
    department = 'Department of the volunteer.'
  )
);

SELECT
  volunteer_id,
  department
FROM staging.stg_app_db__volunteers
"""


@dataclass
class Prod:
    """A warehouse whose prod environment was built from the demo, and the reports reviewed on it so far."""

    warehouse: Warehouse
    root: Path
    reports: dict[str, tuple[int, str]] = field(default_factory=dict)

    def query(self, statement: str) -> list[tuple[object, ...]]:
        """Rows of a query on the warehouse."""
        return self.warehouse.query(statement)


@pytest.fixture(scope="module", params=["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def prod(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, fresh_warehouse: Any
) -> Iterator[Prod]:
    """The whole flow run once on a small demo source, into a DuckDB file or a fresh PostgreSQL database."""
    root = tmp_path_factory.mktemp(f"review-{request.param}")
    with (
        fresh_warehouse(request.param, root, "t_review") as warehouse,
        pytest.MonkeyPatch.context() as patch,
    ):
        set_environment(patch, demo_settings(root, "review-test-key", warehouse, scale=0.05))
        run_flow(warehouse, pipelines_dir=root / "pipelines", out=io.StringIO())
        yield Prod(warehouse, root)


def _copy_project(root: Path, name: str) -> Path:
    """A copy of what SQLMesh reads, unit tests included: the branch."""
    return copy_project(root / "branches" / name, unit_tests=True)


def _drop_organization_kind(project: Path, model: str) -> None:
    """Remove organization_kind from a missions model's final SELECT and its column descriptions."""
    edit(project, model, "\n  organization_kind,\n  applications_total", "\n  applications_total")
    edit(project, model, "    organization_kind = 'Kind of organization: association, public_body or company.',\n", "")


def _branch(prod: Prod, case: str) -> Path:
    """The project as a pull request of kind ``case`` leaves it."""
    project = prod.root / "branches" / case
    if project.exists():
        return project
    project = _copy_project(prod.root, case)
    if case == "removed":
        _drop_organization_kind(project, MISSIONS)
    elif case == "forward_only":  # another column than "removed": an identical model would reuse its snapshot
        edit(project, MISSIONS, "\n  department,\n  mission_status,\n", "\n  mission_status,\n")
    elif case == "renamed":
        edit(project, MISSIONS, "\n  places,\n  start_date,\n", "\n  places AS places_offered,\n  start_date,\n")
    elif case == "retyped":
        edit(project, MISSIONS, "\n  places,\n  start_date,\n", "\n  CAST(places AS TEXT) AS places,\n  start_date,\n")
    elif case == "added":
        declined = "applications_total - applications_accepted - applications_pending AS applications_declined"
        edit(project, MISSIONS, "  last_updated_at\nFROM", f"  last_updated_at,\n  {declined}\nFROM")
        edit(
            project,
            MISSIONS,
            "    last_updated_at = ",
            "    applications_declined = 'Applications refused.',\n    last_updated_at = ",
        )
        _add_declined_to_unit_test(project / "tests" / "test_missions_v1.yaml")
    elif case == "v2":
        v2 = "models/marts/missions_v2.sql"
        shutil.copy(project / MISSIONS, project / v2)
        edit(project, v2, "name marts.missions_v1,", "name marts.missions_v2,")
        _drop_organization_kind(project, v2)
    elif case == "personal":  # a published view of volunteers' keys: pseudonymous, still personal data
        (project / PERSONAL_MART).write_text(VOLUNTEER_KEYS_MART)
    elif case == "staging":
        model = "models/staging/app_db/stg_app_db__organizations.sql"
        edit(project, model, "TRIM(name) AS organization_name", "UPPER(TRIM(name)) AS organization_name")
    else:
        raise AssertionError(case)
    return project


def _add_declined_to_unit_test(path: Path) -> None:
    """The unit test of missions_v1 expects the new column too (a pull request adding a column updates its test)."""
    pattern = re.compile(r"applications_total: (\d+), applications_accepted: (\d+), applications_pending: (\d+),")

    def add(match: re.Match[str]) -> str:
        total, accepted, pending = (int(g) for g in match.groups())
        return f"{match.group(0)} applications_declined: {total - accepted - pending},"

    inputs, outputs = path.read_text().split("\n  outputs:\n")
    outputs, count = pattern.subn(add, outputs)
    assert count >= 3, "the expected rows of test_missions_v1.yaml changed shape"
    path.write_text(inputs + "\n  outputs:\n" + outputs)


def _review(prod: Prod, case: str, *extra: str) -> tuple[int, str]:
    """Exit code and report of ``python -m datamart review`` on the branch ``case`` (memoised per warehouse)."""
    if case not in prod.reports:
        project = _branch(prod, case)
        output = prod.root / "reports" / f"{case}.md"
        code = main(["review", "--env", f"pr_{case}", "--project", str(project), "--output", str(output), *extra])
        prod.reports[case] = (code, output.read_text())
    return prod.reports[case]


def _section(report: str, heading: str) -> str:
    """One ``## `` section of the report (up to the next one)."""
    start = report.index(heading + "\n")
    end = report.find("\n## ", start + len(heading))
    return report[start : end if end != -1 else None]


def _data_diff_row(report: str, view: str) -> dict[str, int]:
    """The counts of a view's data diff table."""
    section = _section(report, "## Data diff against prod")
    block = section[section.index(f"### `{view}`") :]
    header, _rule, values = block.splitlines()[2:5]
    names = [c.strip() for c in header.strip("|").split("|")]
    return dict(zip(names, (int(v) for v in values.strip("|").split("|")), strict=True))


def _checksum(prod: Prod, view: str) -> tuple[int, str]:
    return view_checksum(prod.query, view)


def _prod_fingerprints(prod: Prod) -> dict[str, str]:
    context = sqlmesh_context(prod.warehouse)
    environment = context.state_reader.get_environment("prod")
    return {s.name: s.fingerprint.to_identifier() for s in environment.snapshots}


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("removed", "column `organization_kind` would be removed"),
        ("renamed", "column `places` would be renamed to `places_offered`"),
        ("retyped", "column `places` would change type from BIGINT to TEXT"),
    ],
)
def test_breaking_change_to_a_published_view_is_refused(prod: Prod, case: str, expected: str) -> None:
    code, report = _review(prod, case)
    assert code == 1
    contract = _section(report, CONTRACT)
    assert f"- marts.missions_v1: {expected}" in contract
    assert "publish the change as marts.missions_v2 beside it" in contract, "the way out is named"
    assert "**❌ Refused**" in report
    assert "| `marts.missions_v1` | breaking (direct) | yes |" in report


def test_forward_only_change_dropping_a_published_column_is_refused(prod: Prod) -> None:
    code, report = _review(prod, "forward_only", "--forward-only")
    assert code == 1
    assert "| `marts.missions_v1` | breaking, forward-only (direct) | yes |" in report
    assert (
        "- marts.missions_v1: column `department` would be removed (a forward-only change: SQLMesh would "
        "ALTER the prod table in place)" in _section(report, CONTRACT)
    )


def test_added_column_passes_as_non_breaking_with_the_new_column_in_the_data_diff(prod: Prod) -> None:
    code, report = _review(prod, "added")
    assert code == 0, report
    assert "**✅ Passes**" in report
    assert "| `marts.missions_v1` | non-breaking (direct) | yes |" in report
    assert "| `marts.missions_v1` | ✅ columns added | `applications_declined` added (BIGINT) |" in report
    missions = prod.query("SELECT count(*) FROM marts.missions_v1")[0][0]
    counts = _data_diff_row(report, "marts.missions_v1")
    assert counts == {
        "rows in prod": missions,
        "rows in branch": missions,
        "only in prod": 0,
        "only in branch": 0,
        "identical": missions,
        "changed values": 0,
    }
    assert "New columns: `applications_declined`." in _section(report, "## Data diff against prod")
    assert "❌" not in report


def test_staging_change_shows_the_changed_published_rows(prod: Prod) -> None:
    code, report = _review(prod, "staging")
    assert code == 0, report
    assert "| `staging.stg_app_db__organizations` | breaking (direct) | no |" in report
    assert "| `marts.organizations_v1` | indirect breaking (indirect) | yes |" in report
    for view, key in (("organizations_v1", "organization_id"), ("missions_v1", "mission_id")):
        rows = prod.query(f"SELECT count(*) FROM marts.{view}")[0][0]
        changed = prod.query(
            f"SELECT count(*) FROM marts.{view} AS p JOIN marts__pr_staging.{view} AS b USING ({key}) "
            "WHERE p.organization_name IS DISTINCT FROM b.organization_name"
        )[0][0]
        assert 0 < changed <= rows
        counts = _data_diff_row(report, f"marts.{view}")
        assert (counts["rows in prod"], counts["rows in branch"], counts["changed values"]) == (rows, rows, changed)
        assert counts["identical"] == rows - changed
    sample = _section(report, "## Data diff against prod")
    assert "| organization_id | prod: organization_name | branch: organization_name |" in sample
    before, after = prod.query(
        "SELECT p.organization_name, b.organization_name FROM marts.organizations_v1 AS p "
        "JOIN marts__pr_staging.organizations_v1 AS b USING (organization_id) ORDER BY organization_id LIMIT 1"
    )[0]
    assert f"| {before} | {after} |" in sample and before != after
    lineage = _section(report, "## Lineage of the change")
    assert "staging_stg_app_db__organizations --> marts_organizations_v1" in lineage


def test_report_structure(prod: Prod) -> None:
    """The skeleton a reviewer learns to read: headings and table headers, in order (no figures, no timings)."""
    _code, report = _review(prod, "staging")
    lines = report.splitlines()
    skeleton = [
        line
        for number, line in enumerate(lines)
        if line.startswith("#")
        or line.startswith("```mermaid")
        or (line.startswith("| ") and number + 1 < len(lines) and lines[number + 1].startswith("|---"))
    ]
    assert skeleton == [
        "# Datamart review: `pr_staging` against prod",
        "## Changed models",
        "| model | change (SQLMesh category) | published |",
        "## Lineage of the change",
        "```mermaid",
        "## Contract of the published views",
        "| published view | against prod | column changes |",
        "## Personal data",
        "| published column | personal source column | verdict |",
        "## Small cells",
        "| published model | counts people | small cells |",
        "## Data diff against prod",
        "### `marts.missions_v1`",
        "| rows in prod | rows in branch | only in prod | only in branch | identical | changed values |",
        "| mission_id | prod: organization_name | branch: organization_name |",
        "### `marts.organizations_v1`",
        "| rows in prod | rows in branch | only in prod | only in branch | identical | changed values |",
        "| organization_id | prod: organization_name | branch: organization_name |",
        "## Audits",
        "## Unit tests",
    ]
    assert report.startswith("<!-- datamart-review -->\n")


def test_removing_a_published_view_needs_a_declared_retirement(prod: Prod) -> None:
    project = _copy_project(prod.root, "retire")
    (project / "models" / "marts" / "organizations_v1.sql").unlink()
    violations = run_checks(gate_input(sqlmesh_context(prod.warehouse, project), project))
    messages = [v.message for found in violations.values() for v in found]
    assert len(messages) == 1 and messages[0].startswith("marts.organizations_v1: the published view would disappear")
    assert "retired_views.yaml" in messages[0]

    declaration = {"retired_views": [{"view": "marts.organizations_v1", "reason": "replaced by a v2 in Metabase"}]}
    (project / "retired_views.yaml").write_text(yaml.safe_dump(declaration))
    violations = run_checks(gate_input(sqlmesh_context(prod.warehouse, project), project))
    assert not [v for found in violations.values() for v in found]


def test_promotion_refuses_what_review_refuses_and_prod_is_untouched(prod: Prod) -> None:
    before = _checksum(prod, "marts.missions_v1")
    fingerprints = _prod_fingerprints(prod)
    project = _copy_project(prod.root, "promote_removed")
    _drop_organization_kind(project, MISSIONS)
    with pytest.raises(GateError, match=r"marts\.missions_v1: column `organization_kind` would be removed"):
        apply_prod(prod.warehouse, project)
    assert _checksum(prod, "marts.missions_v1") == before
    assert _prod_fingerprints(prod) == fingerprints


def test_a_published_personal_column_is_refused_by_review_and_promotion(prod: Prod) -> None:
    """The privacy lineage check is part of the gate: the report names it, and promotion refuses it."""
    code, report = _review(prod, "personal")
    assert code == 1
    section = _section(report, "## Personal data")
    assert "`marts.volunteer_keys_v1.volunteer_id` | `app_db.volunteers.id` | **refused**" in section
    assert "`marts.volunteer_activity_v1.birth_decade` | `app_db.volunteers.birth_date` | allowed: declared" in section
    with pytest.raises(GateError, match=r"\[Personal data\] marts\.volunteer_keys_v1\.volunteer_id derives from"):
        apply_prod(prod.warehouse, _branch(prod, "personal"))
    assert "marts.volunteer_keys_v1" not in {row[0] for row in prod.query(_published_views_sql())}


def _published_views_sql() -> str:
    return "SELECT table_schema || '.' || table_name FROM information_schema.tables WHERE table_schema = 'marts'"


def _workflow(name: str) -> dict[str, object]:
    document = yaml.safe_load((PROJECT_ROOT / ".github" / "workflows" / name).read_text())
    assert isinstance(document, dict)
    document["on"] = document.pop(True, document.get("on"))  # YAML 1.1 reads the key `on` as true
    return document


def _make_targets(workflow: dict[str, object]) -> list[str]:
    """The make targets the workflow's steps run, in order."""
    targets = []
    for job in workflow["jobs"].values():  # type: ignore[union-attr]
        for step in job["steps"]:
            targets += re.findall(r"^\s*make ([a-z-]+)", step.get("run", ""), re.MULTILINE)
    return targets


def test_ci_workflows_run_the_make_targets() -> None:
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    review = _workflow("review.yml")
    assert "pull_request" in review["on"]
    assert _make_targets(review) == ["install", "run", "install", "review"]
    job = review["jobs"]["review"]
    assert job["services"]["postgres"]["image"].startswith("postgres:")
    assert job["env"]["DATAMART_TARGET"] == "postgres"
    post = next(step for step in job["steps"] if step.get("uses", "").startswith("actions/github-script"))
    assert (
        str(DEFAULT_OUTPUT.relative_to(PROJECT_ROOT)) in post["with"]["script"]
        and "<!-- datamart-review -->" in post["with"]["script"]
    )
    assert any("exit 1" in step.get("run", "") for step in job["steps"]), "the job fails when the review refuses"

    promote = _workflow("promote.yml")
    assert promote["on"] == {"push": {"branches": ["main"]}}
    assert _make_targets(promote) == ["install", "promote"]
    for target in {*_make_targets(review), *_make_targets(promote)}:
        assert re.search(rf"^{target}: .*## ", makefile, re.MULTILINE), f"make {target} is not a documented target"


def test_a_later_push_of_the_branch_is_compared_with_prod_not_with_its_previous_build(prod: Prod) -> None:
    _review(prod, "removed")  # the first push, refused, left the environment pr_removed behind
    project = _branch(prod, "added")
    output = prod.root / "reports" / "second-push.md"
    code = main(["review", "--env", "pr_removed", "--project", str(project), "--output", str(output)])
    report = output.read_text()
    assert code == 0, report
    assert "| `marts.missions_v1` | non-breaking (direct) | yes |" in report
    assert "| `marts.missions_v1` | ✅ columns added | `applications_declined` added (BIGINT) |" in report


# Last: it promotes, so prod serves missions_v2 afterwards.
def test_v2_beside_v1_passes_and_both_answer_after_promotion(prod: Prod) -> None:
    code, report = _review(prod, "v2")
    assert code == 0, report
    assert "| `marts.missions_v2` | added (model file) | yes |" in report
    assert (
        "| `marts.missions_v2` | ✅ new view | against `marts.missions_v1`, which stays: "
        "`organization_kind` removed (was TEXT) |" in report
    )
    assert "| `marts.missions_v1` | unchanged | — |" in report
    missions_before = _checksum(prod, "marts.missions_v1")
    diff = _section(report, "## Data diff against prod")
    assert f"New published view: {missions_before[0]} rows in the branch, none in prod." in diff

    promoted = apply_prod(prod.warehouse, prod.root / "branches" / "v2")
    assert "marts.missions_v2" in promoted.published_views
    assert _checksum(prod, "marts.missions_v1") == missions_before, "v1 keeps answering, unchanged"
    v1_count = missions_before[0]
    assert prod.query("SELECT count(*) FROM marts.missions_v2")[0][0] == v1_count > 0
    assert prod.query("SELECT count(DISTINCT organization_kind) FROM marts.missions_v1")[0][0] > 0
    with pytest.raises(Exception, match="organization_kind"):
        prod.query("SELECT organization_kind FROM marts.missions_v2")
