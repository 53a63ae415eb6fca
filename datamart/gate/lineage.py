"""Which published columns derive from personal source columns, through SQLMesh's column-level lineage.

The personal source columns are the ones declared under ``personal:`` in ``pipelines/*.yaml`` with a treatment
that lets a derivative reach the warehouse (``hash``: the pseudonym keeps the column's name; ``year``: ``birth_date``
is loaded as ``birth_year``), plus the primary key of every table that declares personal columns (the key of a
person's row identifies that person, pseudonymously). ``drop`` columns are never loaded: the check only verifies
that no raw table declares them; ``keep`` columns are classified as not personal.

From each column of each published model (schema ``marts``), SQLMesh's lineage (``sqlmesh.core.lineage.lineage``,
sqlglot's column lineage over the rendered query) is followed model by model down to the raw tables. Every path that
ends at a personal source column is a finding. A finding is allowed when

- the path goes through a ``COUNT`` (``COUNT(DISTINCT volunteer_pseudonym)``, ``COUNT(*) FILTER (WHERE birth_year <
  1990)``): a count discloses no value of the column. This is recognised automatically;
- or the published model declares the column in its tags: ``tags ('personal:<column>')``, e.g. ``tags
  ('personal:birth_decade')`` — a reviewed, deliberate use (coarsened, aggregated, small cells suppressed).

Anything else — the pseudonym itself, a birth year, a ``MIN``/``MAX``/``STRING_AGG`` that can return the value — is
a violation: the check fails and names the model, the column and the source column.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlglot import exp

from datamart.gate.base import GateInput, Violation, is_published, short_name
from datamart.ingest.declarations import PipelineDecl, load_all
from datamart.ingest.personal import DROP, HASH, YEAR, loaded_column

ALLOW_TAG_PREFIX = "personal:"
COUNTING = (exp.Count, exp.ApproxDistinct)
TRACKED_TREATMENTS = (HASH, YEAR, "key")  # "key": a primary key column not declared personal


@dataclass(frozen=True)
class PersonalColumn:
    """A personal source column and the raw warehouse column that carries it (None when it is never loaded)."""

    pipeline: str
    table: str
    column: str  # as named in the source
    treatment: str  # hash, drop, year, keep, or key (the primary key of a table holding personal data)
    dataset: str
    raw_column: str | None

    @property
    def source_name(self) -> str:
        """``<pipeline>.<table>.<column>``: how findings and the register name it."""
        return f"{self.pipeline}.{self.table}.{self.column}"

    @property
    def raw_table(self) -> str:
        """``<dataset>.<table>``: the raw table dlt loads it into."""
        return f"{self.dataset}.{self.table}"

    @property
    def tracked(self) -> bool:
        """Whether its derivatives are followed to the marts (a dropped column never exists, a kept one is not
        personal)."""
        return self.treatment in TRACKED_TREATMENTS and self.raw_column is not None


@dataclass(frozen=True)
class Origin:
    """One path from a model column down to a personal source column."""

    personal: PersonalColumn
    counted: bool  # the path goes through a COUNT
    aggregated: bool  # the path goes through any aggregate function (COUNT included)
    path: tuple[str, ...]  # model.column hops, from the column down to the raw column


@dataclass(frozen=True)
class LineageFinding:
    """A published column that derives from a personal source column; ``allowed`` False is a violation."""

    model: str  # marts.<name>
    column: str
    source_column: str  # <pipeline>.<table>.<column>
    allowed: bool
    message: str
    treatment: str = ""
    path: tuple[str, ...] = field(default=())


def personal_columns(declarations: Iterable[PipelineDecl] | None = None) -> list[PersonalColumn]:
    """Every declared personal column (and the key of every table declaring some), mapped to its raw column."""
    found = []
    for decl in load_all() if declarations is None else declarations:
        for table in decl.tables:
            if not table.personal:
                continue
            for key in table.primary_key:
                if key not in table.personal:
                    found.append(PersonalColumn(decl.name, table.name, key, "key", decl.dataset, key))
            for column, treatment in table.personal.items():
                raw = loaded_column(column, treatment)
                found.append(PersonalColumn(decl.name, table.name, column, treatment, decl.dataset, raw))
    return found


class LineageIndex:
    """Column origins of every model of a SQLMesh context, memoised (each model's lineage is computed once)."""

    def __init__(self, context: Any, personal: list[PersonalColumn] | None = None) -> None:
        self.context = context
        self.personal = personal if personal is not None else personal_columns()
        self.by_raw = {(p.raw_table, p.raw_column): p for p in self.personal if p.tracked}
        self.models = {short_name(m.fqn): m for m in context.models.values()}
        self._memo: dict[tuple[str, str], list[Origin]] = {}

    def origins(self, model_name: str, column: str) -> list[Origin]:
        """Every path from ``model_name.column`` down to a personal source column."""
        key = (model_name, column)
        if key in self._memo:
            return self._memo[key]
        self._memo[key] = []  # a cycle cannot happen in a DAG; this guards against surprises
        model = self.models.get(model_name)
        found: list[Origin] = []
        if model is None or model.kind.is_external:
            personal = self.by_raw.get((model_name, column))
            if personal is not None:
                found.append(Origin(personal, False, False, (f"{model_name}.{column}",)))
        else:
            for parent, parent_column, counted, aggregated in self._parents(model, column):
                for origin in self.origins(parent, parent_column):
                    found.append(
                        Origin(
                            origin.personal,
                            origin.counted or counted,
                            origin.aggregated or aggregated,
                            (f"{model_name}.{column}", *origin.path),
                        )
                    )
        self._memo[key] = found
        return found

    def _parents(self, model: Any, column: str) -> list[tuple[str, str, bool, bool]]:
        """The parent model columns one model column is computed from, and whether that goes through a COUNT or an
        aggregate (sqlglot's lineage inside the model's query, CTE by CTE)."""
        from sqlmesh.core.lineage import lineage

        root = lineage(exp.to_identifier(column).name, model, trim_selects=False)
        parents: list[tuple[str, str, bool, bool]] = []

        def walk(node: Any, counted: bool, aggregated: bool) -> None:
            if not node.downstream:
                # a leaf's expression is the table it reads (find includes the node itself)
                table = node.expression.find(exp.Table) if isinstance(node.expression, exp.Expr) else None
                if table is not None and table.name:
                    parents.append((f"{table.db}.{table.name}", exp.to_column(node.name).name, counted, aggregated))
                return
            for child in node.downstream:
                child_column = exp.to_column(child.name).name
                walk(
                    child,
                    counted or _only_counted(node.expression, child_column),
                    aggregated or _under_aggregate(node.expression, child_column),
                )

        walk(root, False, False)
        return parents


def _references(expression: Any, column: str) -> list[exp.Column]:
    if not isinstance(expression, exp.Expr):
        return []
    return [c for c in expression.find_all(exp.Column) if c.name == column]


def _counting_ancestor(column: exp.Column) -> bool:
    """Whether the column is an argument of a COUNT, or in the FILTER of one."""
    node = column.parent
    while node is not None:
        if isinstance(node, COUNTING):
            return True
        if isinstance(node, exp.Filter) and isinstance(node.this, COUNTING):
            return True
        node = node.parent
    return False


def _only_counted(expression: Any, column: str) -> bool:
    refs = _references(expression, column)
    return bool(refs) and all(_counting_ancestor(c) for c in refs)


def _under_aggregate(expression: Any, column: str) -> bool:
    refs = _references(expression, column)
    return bool(refs) and all(c.find_ancestor(exp.AggFunc) is not None for c in refs)


def allowed_columns(model: Any) -> set[str]:
    """The columns a model declares as a deliberate use of personal data: ``tags ('personal:<column>')``."""
    return {tag[len(ALLOW_TAG_PREFIX) :].strip().lower() for tag in model.tags if tag.startswith(ALLOW_TAG_PREFIX)}


def published_models(context: Any) -> list[Any]:
    """The models of the published schema (what Metabase reads), by name."""
    models = [m for m in context.models.values() if not m.kind.is_external]
    return sorted((m for m in models if is_published(m.fqn)), key=lambda m: m.fqn)


def check_published_lineage(context: Any, index: LineageIndex | None = None) -> list[LineageFinding]:
    """Every published column deriving from a personal source column; ``allowed`` False for each violation.

    ``context`` is a SQLMesh Context (``datamart.transform.sqlmesh_context``); nothing is read from the warehouse.
    """
    index = index or LineageIndex(context)
    findings: list[LineageFinding] = []
    for model in published_models(context):
        name = short_name(model.fqn)
        allowed_here = allowed_columns(model)
        for column in model.columns_to_types or {}:
            seen: set[str] = set()
            for origin in index.origins(name, column):
                source = origin.personal.source_name
                if source in seen:
                    continue
                seen.add(source)
                same_source = [o for o in index.origins(name, column) if o.personal.source_name == source]
                counted = all(o.counted for o in same_source)
                findings.append(_finding(name, column, origin, counted, column.lower() in allowed_here))
    return findings


def _finding(model: str, column: str, origin: Origin, counted: bool, declared: bool) -> LineageFinding:
    personal = origin.personal
    what = f"{model}.{column} derives from personal column {personal.source_name} ({_describe(personal)})"
    via = " → ".join(origin.path)
    if counted:
        message = f"{what}: only counted (allowed)"
        return LineageFinding(model, column, personal.source_name, True, message, personal.treatment, origin.path)
    if declared:
        message = f"{what}: allowed by tags ('{ALLOW_TAG_PREFIX}{column}') in the model"
        return LineageFinding(model, column, personal.source_name, True, message, personal.treatment, origin.path)
    message = (
        f"{what}, via {via}: Metabase would read it. Remove it from {model}, publish only a count of it "
        f"(COUNT(DISTINCT …)), or, after review, declare the use in the model: tags ('{ALLOW_TAG_PREFIX}{column}')"
    )
    return LineageFinding(model, column, personal.source_name, False, message, personal.treatment, origin.path)


def _describe(personal: PersonalColumn) -> str:
    return {
        HASH: f"pseudonymised, raw column {personal.raw_column}",
        YEAR: f"coarsened to a year, raw column {personal.raw_column}",
        "key": "key of a person's row",
    }.get(personal.treatment, personal.treatment)


def dropped_columns_loaded(context: Any, personal: list[PersonalColumn] | None = None) -> list[str]:
    """Columns declared ``drop`` that the raw tables' external models nevertheless declare (a leak): messages."""
    models = {short_name(m.fqn): m for m in context.models.values() if m.kind.is_external}
    problems = []
    for p in personal if personal is not None else personal_columns():
        if p.treatment != DROP:
            continue
        model = models.get(p.raw_table)
        if model is not None and p.column in (model.columns_to_types or {}):
            problems.append(
                f"{p.raw_table}.{p.column}: declared drop in pipelines/{p.pipeline}.yaml but present in the raw "
                "table (external_models.yaml): regenerate with `make external-models` after the next run, and "
                "check the pipeline"
            )
    return problems


def violations(findings: list[LineageFinding]) -> list[LineageFinding]:
    """The findings that are not allowed."""
    return [f for f in findings if not f.allowed]


def check_personal_data(gate: GateInput) -> list[Violation]:
    """The review gate's "Personal data" check: every published use of personal data that is not allowed."""
    refused = [
        Violation(model=f.model, message=f.message, column=f.column)
        for f in violations(check_published_lineage(gate.context))
    ]
    leaks = [Violation(model=leak.split(":")[0], message=leak) for leak in dropped_columns_loaded(gate.context)]
    return refused + leaks


def describe_personal_data(gate: GateInput) -> str:
    """Markdown for the review report: each published column deriving from personal data, and why it is allowed."""
    findings = check_published_lineage(gate.context)
    if not findings:
        return "No published column derives from a personal source column."
    rows = ["| published column | personal source column | verdict |", "|---|---|---|"]
    for f in findings:
        verdict = "allowed: only counted" if f.allowed and "only counted" in f.message else "allowed: declared"
        rows.append(f"| `{f.model}.{f.column}` | `{f.source_column}` | {verdict if f.allowed else '**refused**'} |")
    return "\n".join(rows)
