"""Small cells: a published model that counts people suppresses the groups of fewer than the threshold, by the
project's construction (``@merge_small_cell`` and ``HAVING … >= @small_cell_threshold()``, macros/privacy.py),
checked at every build by the audit ``assert_no_small_cells``. This check refuses a published model that counts
people without that audit, whoever wrote it: the rule is the tool's, not the author's memory.

What "counts people" means here, read from the models themselves:

- a *person's table* is a raw table declaring personal columns in ``pipelines/*.yaml`` (its rows are people); a
  model has *a person's grain* when a column of its ``grain`` comes, unaggregated, from the key or a pseudonym of a
  person's table (SQLMesh's column lineage, :class:`datamart.gate.lineage.LineageIndex`): ``stg_app_db__volunteers``
  (grain ``volunteer_id``), ``int_volunteer_applications`` (one row per volunteer);
- a query *counts people* when a ``COUNT`` is computed over rows of such a table or model: in a scope (a SELECT, a
  CTE) reading it directly, or through CTEs and subqueries that keep its rows (no ``GROUP BY``, no aggregate); a
  model of a person's grain counts things per person (applications per volunteer), not people;
- a published model *counts people* when its own query does, or a model upstream of it does (a count made in an
  intermediate model and published as is).

Such a published model must run ``assert_no_small_cells`` (audits/assert_no_small_cells.sql), which fails the build
(so prod keeps its previous version) when a row describes fewer people than the threshold.
"""

from __future__ import annotations

from typing import Any

from sqlglot import exp
from sqlglot.optimizer.scope import Scope, traverse_scope

from datamart.gate.base import GateInput, Violation, short_name
from datamart.gate.lineage import LineageIndex, published_models
from datamart.ingest.personal import HASH

AUDIT = "assert_no_small_cells"


def person_sources(index: LineageIndex) -> set[str]:
    """The raw tables and models whose rows are people (``schema.table`` names)."""
    people = {p.raw_table for p in index.personal}
    for name, model in index.models.items():
        if model.kind.is_external:
            continue
        columns = {c.name for grain in model.grains for c in grain.find_all(exp.Column) if c.name}
        if any(
            o.personal.treatment in ("key", HASH) and not o.aggregated
            for column in sorted(columns)
            for o in index.origins(name, column)
        ):
            people.add(name)
    return people


def _keeps_rows(scope: Scope) -> bool:
    """A scope whose rows are its source's rows (no grouping, no aggregate): counting its rows counts theirs."""
    select = scope.expression
    if not isinstance(select, exp.Select):
        return False
    return select.args.get("group") is None and not any(e.find(exp.AggFunc) is not None for e in select.expressions)


def _reads_people(scope: Scope, people: set[str]) -> str | None:
    """The person's table or model this scope's rows come from (directly, or through scopes keeping its rows)."""
    for source in scope.sources.values():
        if isinstance(source, exp.Table):
            name = f"{source.db}.{source.name}" if source.db else source.name
            if name in people:
                return name
        elif isinstance(source, Scope) and _keeps_rows(source):
            found = _reads_people(source, people)
            if found:
                return found
    return None


def counts_people(model: Any, people: set[str]) -> str | None:
    """``COUNT(…) over <table>`` when the model's query counts rows of a person's table or model, else None."""
    try:
        query = model.render_query()
    except Exception:  # noqa: BLE001 - a query SQLMesh cannot render is reported by SQLMesh itself
        return None
    if query is None:
        return None
    for scope in traverse_scope(query):
        select = scope.expression
        if not isinstance(select, exp.Select):
            continue
        counts = [c for e in select.expressions for c in e.find_all(exp.Count)]
        if not counts:
            continue
        source = _reads_people(scope, people)
        if source:
            unqualified = counts[0].transform(lambda n: exp.column(n.name) if isinstance(n, exp.Column) else n)
            return f"{unqualified.sql(dialect=model.dialect)} over {source}"
    return None


def _upstream(models: dict[str, Any], fqn: str) -> list[str]:
    """The models ``fqn`` reads, directly or not (from each model's ``depends_on``: the gate also checks sets of
    models taken from snapshots, which have no DAG of their own)."""
    found: list[str] = []
    stack = list(models[fqn].depends_on)
    while stack:
        parent = stack.pop()
        if parent in found or parent not in models:
            continue
        found.append(parent)
        stack.extend(models[parent].depends_on)
    return found


def published_counts(context: Any) -> list[tuple[Any, str, str]]:
    """Each published model that counts people (itself or upstream): the model, where the count is (a model's short
    name) and what it counts (``COUNT(…) over <table>``). Each model's query is read once."""
    index = LineageIndex(context)
    people = person_sources(index)
    counting = {}
    for name, model in index.models.items():
        # a model whose rows are people counts things per person (applications per volunteer), not people
        if not model.kind.is_external and name not in people:
            found = counts_people(model, people)
            if found:
                counting[model.fqn] = (name, found)
    found_in = []
    for model in published_models(context):
        upstream = [model.fqn, *_upstream(context.models, model.fqn)]
        where = next((counting[fqn] for fqn in upstream if fqn in counting), None)
        if where is not None:
            found_in.append((model, *where))
    return found_in


def _audited(model: Any) -> bool:
    return any(name == AUDIT for name, _ in model.audits)


def check_small_cells(gate: GateInput) -> list[Violation]:
    """Every published model counting people (itself or upstream) without the audit ``assert_no_small_cells``."""
    violations = []
    for model, where, what in published_counts(gate.context):
        if _audited(model):
            continue
        name = short_name(model.fqn)
        origin = "" if where == name else f" (in {where}, which it reads)"
        violations.append(
            Violation(
                model=name,
                message=(
                    f"{name} counts people: {what}{origin}, and Metabase would show groups of any size (a "
                    'group of 1 or 2 identifies them). Send the groups under the threshold to one "other" group '
                    "with @merge_small_cell and keep HAVING SUM(<people>) >= @small_cell_threshold() (macros/"
                    f"privacy.py, as models/marts/volunteer_activity_v1.sql does), and audit the model with "
                    f"{AUDIT}(people := <the column counting people>)"
                ),
            )
        )
    return violations


def describe_small_cells(gate: GateInput) -> str:
    """Markdown for the review report: the published models counting people, and their audit."""
    rows = [
        f"| `{short_name(model.fqn)}` | {what} | {'audited' if _audited(model) else '**refused**'} |"
        for model, _, what in published_counts(gate.context)
    ]
    if not rows:
        return "No published model counts people."
    return "\n".join(["| published model | counts people | small cells |", "|---|---|---|", *rows])
