"""The personal-data register (``docs/personal-data.md``): what a team needs for its RGPD processing register.

Generated from the pipeline declarations (each personal column and its treatment), SQLMesh's column lineage (where
its derivatives go, which published columns and why they are allowed) and the grants (who can read each layer).
``make privacy-register`` writes it; tests/test_privacy.py fails when the committed file is stale.
"""

from __future__ import annotations

from typing import Any

from datamart.gate.lineage import (
    ALLOW_TAG_PREFIX,
    LineageIndex,
    check_published_lineage,
    personal_columns,
    short_name,
)
from datamart.ingest.personal import DROP, HASH, KEEP, YEAR
from datamart.settings import PROJECT_ROOT, PUBLISHED_SCHEMA

REGISTER_PATH = PROJECT_ROOT / "docs" / "personal-data.md"

_TREATMENTS = {
    HASH: "pseudonymised at extraction: keyed HMAC-SHA256 with the secret `datamart.pii_hmac_key` (same value, "
    "same pseudonym; irreversible without the key)",
    DROP: "never read from the source",
    YEAR: "coarsened at extraction: only the year leaves the source",
    KEEP: "classified as not personal: loaded as is",
    "key": "identifies the person's row (a technical key, loaded as is: pseudonymous data)",
}


def render_register(context: Any, metabase_role: str = "metabase") -> str:
    """The register's Markdown text (deterministic: from the project's files only, no warehouse is read)."""
    personal = personal_columns()
    index = LineageIndex(context, personal)
    models = sorted((m for m in context.models.values() if not m.kind.is_external), key=lambda m: short_name(m.fqn))
    derivatives: dict[str, list[str]] = {}
    for model in models:
        name = short_name(model.fqn)
        for column in model.columns_to_types or {}:
            for source in sorted({o.personal.source_name for o in index.origins(name, column)}):
                derivatives.setdefault(source, []).append(f"`{name}.{column}`")
    published: dict[str, list[str]] = {}
    for finding in check_published_lineage(context, index):
        how = "only counted" if "only counted" in finding.message else f"declared `{ALLOW_TAG_PREFIX}{finding.column}`"
        verdict = how if finding.allowed else "**NOT ALLOWED**"
        published.setdefault(finding.source_column, []).append(f"`{finding.model}.{finding.column}` ({verdict})")

    lines = [
        "# Personal data register",
        "",
        "<!-- GENERATED FILE, do not edit: regenerate with `make privacy-register` "
        "(python -m datamart privacy register); tests/test_privacy.py fails when it is stale. -->",
        "",
        "Every personal column declared in `pipelines/*.yaml`, what is done to it before it leaves the source, where "
        "its derivatives go (SQLMesh column lineage) and who can read them. It is the record a team needs for its "
        "RGPD processing register (the purpose and legal basis are the team's to add). How the guarantees work: "
        "docs/privacy.md.",
        "",
        "## Who can read each layer",
        "",
        "| layer | schemas | who can read it |",
        "|---|---|---|",
        "| raw | `raw_<source>`, dlt's `raw_<source>_staging` (emptied after each load) | the warehouse user "
        "(dlt and SQLMesh) only |",
        "| staging, intermediate | `staging`, `intermediate`, SQLMesh's `sqlmesh__*` | the warehouse user only |",
        f"| published | `{PUBLISHED_SCHEMA}` | the warehouse user, and Metabase's read-only role `{metabase_role}` "
        "(every Metabase user with access to the datamart database); on DuckDB, whoever can read the file |",
        "",
        "## Personal source columns",
        "",
        "| source column | treatment | in the warehouse | derivatives in the models "
        "| published (what Metabase reads) |",
        "|---|---|---|---|---|",
    ]
    for p in personal:
        raw = f"`{p.raw_table}.{p.raw_column}`" if p.raw_column and p.treatment != DROP else "never loaded"
        if p.treatment == KEEP:
            derived, shown = "not followed (not personal)", "—"
        else:
            derived = ", ".join(derivatives.get(p.source_name, [])) or "none"
            shown = ", ".join(published.get(p.source_name, [])) or "none"
        lines.append(f"| `{p.source_name}` | {p.treatment}: {_TREATMENTS[p.treatment]} | {raw} | {derived} | {shown} |")
    lines += [
        "",
        "## Erasure",
        "",
        "A person deleted in the source (a right-to-erasure request) is removed from the raw tables at the next "
        "pipeline run (`deletes: {hard: key_set}`), with the rows that refer to them when the source deletes them "
        "too; staging and intermediate are views, and the marts are rebuilt by the same run. "
        "`python -m datamart privacy erased <pipeline> <table> <key> [--value <column>=<clear value>]` lists every "
        "place a trace remains. Tables with hard deletes:",
        "",
    ]
    from datamart.ingest.declarations import load_all

    for decl in load_all():
        for table in decl.tables:
            if table.deletes.get("hard"):
                lines.append(f"- `{decl.name}.{table.name}` → `{decl.dataset}.{table.name}`")
    lines += [
        "",
        "## Small cells",
        "",
        "Published aggregates counting people never show a group of fewer than the SQLMesh variable "
        '`small_cell_threshold` (datamart/sqlmesh_config.py) people: such groups are merged into an "other" row, '
        "itself left out while still too small (macro `@merge_small_cell`, audit `assert_no_small_cells`). "
        "Audited models:",
        "",
    ]
    for model in models:
        if any(audit_name == "assert_no_small_cells" for audit_name, _ in model.audits):
            lines.append(f"- `{short_name(model.fqn)}`")
    return "\n".join(lines) + "\n"
