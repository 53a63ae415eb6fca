"""The review as Markdown, for a pull-request comment (GitHub renders the Mermaid diagram and the tables)."""

from __future__ import annotations

import re

from datamart.review.run import DataDiff, ReviewResult

MARKER = "<!-- datamart-review -->"  # lets the CI update its own comment instead of adding one per push


def render(result: ReviewResult) -> str:
    """The whole report: verdict, changed models, lineage, one section per gate check, data diff, audits, tests."""
    parts = [MARKER, f"# Datamart review: `{result.environment}` against prod", "", _verdict(result), ""]
    parts += _changes(result)
    parts += _lineage(result)
    for outcome in result.checks:
        parts += [f"## {outcome.title}", ""]
        if outcome.violations:
            parts += [f"❌ {len(outcome.violations)} violation(s): the change is refused until they are fixed.", ""]
            parts += [f"- {v.message}" for v in outcome.violations] + [""]
        else:
            parts += ["✅ No violation.", ""]
        if outcome.details:
            parts += [outcome.details, ""]
    parts += _data_diffs(result)
    parts += _audits(result)
    parts += _tests(result)
    parts += [
        "---",
        f"Warehouse: {result.warehouse}. Inspect the branch's views in the schemas suffixed `__{result.environment}` "
        f"(e.g. `marts__{result.environment}`); compare by hand with "
        f'`make sqlmesh ARGS="table_diff prod:{result.environment} <model>"`.',
        "",
    ]
    return "\n".join(parts)


def _verdict(result: ReviewResult) -> str:
    if result.passed:
        return (
            "**✅ Passes**: no published column is lost, renamed or retyped; the branch builds, audits and tests pass."
        )
    reasons = []
    if result.violations:
        reasons.append(f"{len(result.violations)} gate violation(s)")
    if result.build_error:
        reasons.append("the branch failed to build or an audit failed")
    if result.test_failures:
        reasons.append(f"{len(result.test_failures)} unit test(s) failed")
    return f"**❌ Refused**: {', '.join(reasons)}. See below; promotion (`make promote`) refuses the same."


def _changes(result: ReviewResult) -> list[str]:
    lines = ["## Changed models", ""]
    if not result.changes:
        return lines + ["No model differs from prod.", ""]
    lines += ["| model | change (SQLMesh category) | published |", "|---|---|---|"]
    for change in result.changes:
        kind = change.category + (", forward-only" if change.forward_only else "")
        how = "direct" if change.direct else "indirect"
        if change.category in ("added", "removed"):
            how = "model file"
        lines.append(f"| `{change.name}` | {kind} ({how}) | {'yes' if change.published else 'no'} |")
    lines.append("")
    for change in result.changes:
        if change.text_diff:
            lines += [
                f"<details><summary>Text diff of <code>{change.name}</code></summary>",
                "",
                "```diff",
                _strip_headers(change.text_diff),
                "```",
                "</details>",
                "",
            ]
    return lines


def _strip_headers(diff: str) -> str:
    return "\n".join(line for line in diff.splitlines() if line.strip() and not line.startswith(("---", "+++")))


def _node_id(name: str) -> str:
    return re.sub(r"\W", "_", name)


_STYLES = {
    "breaking": "fill:#fc8,stroke:#c60",
    "removed": "fill:#fc8,stroke:#c60",
    "non-breaking": "fill:#dfd,stroke:#080",
    "added": "fill:#dfd,stroke:#080",
    "metadata": "fill:#dfd,stroke:#080",
    "unchanged": "fill:#eee,stroke:#999",
}


def _lineage(result: ReviewResult) -> list[str]:
    lines = ["## Lineage of the change", ""]
    if not result.lineage_nodes:
        return lines + ["Nothing changed.", ""]
    lines += ["```mermaid", "flowchart LR"]
    for name, category in result.lineage_nodes.items():
        label = f"{name}<br/>{category}"
        shape = f'[("{label}")]' if name.split(".")[0] == "marts" else f'["{label}"]'
        lines.append(f"  {_node_id(name)}{shape}")
    lines += [f"  {_node_id(a)} --> {_node_id(b)}" for a, b in result.lineage_edges]
    refused = {v.model for v in result.violations}
    for name, category in result.lineage_nodes.items():
        style = "fill:#f88,stroke:#c00,stroke-width:3px" if name in refused else _STYLES.get(category, "fill:#ffd")
        lines.append(f"  style {_node_id(name)} {style}")
    lines += [
        "```",
        "",
        "Published views (what Metabase reads) are cylinders; red: refused by the contract; orange: breaking "
        "(rebuilt with what depends on it); green: non-breaking; yellow: rebuilt because an upstream model changed.",
        "",
    ]
    return lines


def _data_diffs(result: ReviewResult) -> list[str]:
    lines = ["## Data diff against prod", ""]
    if result.build_error:
        return lines + ["Not computed: the branch did not build (see Audits).", ""]
    if not result.data_diffs:
        return lines + ["No changed published view to compare.", ""]
    for diff in result.data_diffs:
        lines += _data_diff(diff)
    return lines


def _data_diff(diff: DataDiff) -> list[str]:
    lines = [f"### `{diff.view}`", ""]
    if diff.note:
        return lines + [diff.note, ""]
    lines += [
        "| rows in prod | rows in branch | only in prod | only in branch | identical | changed values |",
        "|---|---|---|---|---|---|",
        f"| {diff.prod_rows} | {diff.branch_rows} | {diff.only_prod} | {diff.only_branch} | {diff.matched} "
        f"| {diff.changed} |",
        "",
    ]
    if diff.columns_added:
        lines.append("New columns: " + ", ".join(f"`{c}`" for c in diff.columns_added) + ".")
    if diff.columns_removed:
        lines.append("Columns gone: " + ", ".join(f"`{c}`" for c in diff.columns_removed) + ".")
    if diff.column_match:
        changed = ", ".join(f"`{c}` ({pct:.1f} % equal)" for c, pct in diff.column_match.items())
        lines.append(f"Columns with changed values: {changed}.")
    if diff.sample_rows:
        lines += [
            "",
            f"Sample of changed rows ({len(diff.sample_rows)}):",
            "",
            "| " + " | ".join(diff.sample_header) + " |",
            "|" + "---|" * len(diff.sample_header),
        ]
        lines += ["| " + " | ".join(row) + " |" for row in diff.sample_rows]
    lines.append("")
    return lines


def _audits(result: ReviewResult) -> list[str]:
    lines = ["## Audits", ""]
    if result.build_error:
        failed = ", ".join(f"`{a}`" for a in result.audit_failures) or "see the error"
        lines += [f"❌ Building `{result.environment}` failed (failed audits: {failed}):", "", "```"]
        return lines + [result.build_error.strip(), "```", ""]
    if not result.audits:
        return lines + ["No model needed building (the branch reuses tables already built and audited).", ""]
    total = sum(len(audits) for _, audits in result.audits)
    lines += [f"✅ {total} audits passed on the {len(result.audits)} model(s) built:", ""]
    lines += [f"- `{model}`: {', '.join(audits) or 'none'}" for model, audits in result.audits]
    return lines + [""]


def _tests(result: ReviewResult) -> list[str]:
    lines = ["## Unit tests", ""]
    if result.test_failures:
        lines += [f"❌ {len(result.test_failures)} of {result.tests_run} failed:", ""]
        return lines + [f"- {failure}" for failure in result.test_failures] + [""]
    return lines + [f"✅ {result.tests_run} passed.", ""]
