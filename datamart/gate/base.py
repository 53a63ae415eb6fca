"""What a gate check receives and returns; a module of its own so that checks import it without a cycle.

A check module (``datamart/gate/contract.py``, ``datamart/gate/lineage.py``) imports :class:`GateInput` and
:class:`Violation` from here; ``datamart/gate/checks.py`` imports the checks into its ``CHECKS`` list. The names of
SQLMesh models (:func:`short_name`, :func:`is_published`) are read here too, once for the gate, the review and the
promotion.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datamart.settings import PROJECT_ROOT, PUBLISHED_SCHEMA, Warehouse


def short_name(fqn: str) -> str:
    """``schema.table`` from a fully qualified, quoted SQLMesh name (``"catalog"."schema"."table"``)."""
    return ".".join(fqn.replace('"', "").split(".")[-2:])


def is_published(fqn: str) -> bool:
    """Whether the model is served in the published schema (what Metabase reads)."""
    return short_name(fqn).split(".")[0] == PUBLISHED_SCHEMA


@dataclass(frozen=True)
class Violation:
    """One reason to refuse a change: what it breaks, for whom, and the way out."""

    model: str  # the published view or model concerned, ``marts.missions_v1``
    message: str  # a full sentence naming the view or model, the column and the fix
    column: str | None = None
    check: str = ""  # the title of the check that found it (filled in by run_checks)


@dataclass
class GateInput:
    """What a check may look at: the project as it would be promoted, and what prod serves today."""

    context: Any  # a SQLMesh Context on the project (the branch under review, or the one being promoted)
    prod_snapshots: dict[str, Any] = field(default_factory=dict)  # prod's snapshot of each model, by model fqn
    forward_only: set[str] = field(default_factory=set)  # fqns of models whose change is applied forward-only
    project: Path = PROJECT_ROOT
    warehouse: Warehouse | None = None  # the warehouse prod lives in, for checks that query it
    # the published views' columns recorded by the last good promotion (datamart/gate/published.py), by view; the
    # contract check compares with it rather than with prod's snapshots when set
    contract: dict[str, dict[str, str]] | None = None


@dataclass(frozen=True)
class Check:
    """A named check: ``run`` returns its violations; ``details`` (optional) renders Markdown for the report."""

    title: str
    run: Callable[[GateInput], list[Violation]]
    details: Callable[[GateInput], str] | None = None
