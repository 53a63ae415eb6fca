"""The project's modelling conventions as SQLMesh linter rules (models/README.md), checked by `sqlmesh lint`, `make
lint` and before every `sqlmesh plan`: a plan that breaks one stops before anything is built.

- ``publisheddescribed``: a published model (schema ``marts``, what Metabase reads) says what one row is, and
  describes every column it publishes (Metabase shows the descriptions to its users).
- ``publishedaudited``: a published model runs ``assert_no_personal_columns`` (audits/assert_no_personal_columns.sql).
- ``layernaming``: a model's name says its layer: ``staging.stg_<source>__<entity>``,
  ``intermediate.int_<purpose>``, ``marts.<entity>_v<N>``.
"""

from __future__ import annotations

import re

from sqlmesh.core.linter.rule import Rule, RuleViolation
from sqlmesh.core.model import Model

PUBLISHED_SCHEMA = "marts"
#: a published model's description says what one row is: one short sentence is not enough
MIN_DESCRIPTION = 80
LAYER_NAMES = {
    "staging": (re.compile(r"stg_[a-z0-9]+(?:_[a-z0-9]+)*__[a-z0-9_]+"), "stg_<source>__<entity>"),
    "intermediate": (re.compile(r"int_[a-z0-9_]+"), "int_<purpose>"),
    PUBLISHED_SCHEMA: (re.compile(r"[a-z0-9_]+_v[0-9]+"), "<entity>_v<N>"),
}


def _schema_and_name(model: Model) -> tuple[str, str]:
    parts = model.name.split(".")
    return (parts[-2] if len(parts) > 1 else ""), parts[-1]


def _published(model: Model) -> bool:
    return not model.kind.is_external and _schema_and_name(model)[0] == PUBLISHED_SCHEMA


class PublishedDescribed(Rule):
    """A published model describes what one row is, and every column it publishes."""

    def check_model(self, model: Model) -> RuleViolation | None:
        if not _published(model):
            return None
        problems = []
        if len(model.description or "") < MIN_DESCRIPTION:
            problems.append(f"its description must say what one row is (at least {MIN_DESCRIPTION} characters)")
        undescribed = sorted(set(model.columns_to_types or {}) - set(model.column_descriptions))
        if undescribed:
            problems.append(f"no description in column_descriptions for {', '.join(undescribed)}")
        if not problems:
            return None
        return self.violation(f"{model.name}: published to Metabase, but " + "; ".join(problems) + ".")


class PublishedAudited(Rule):
    """A published model runs the audit assert_no_personal_columns."""

    def check_model(self, model: Model) -> RuleViolation | None:
        if not _published(model) or any(name == "assert_no_personal_columns" for name, _ in model.audits):
            return None
        return self.violation(
            f"{model.name}: published to Metabase without the audit assert_no_personal_columns; add it to the "
            "model's audits (audits/assert_no_personal_columns.sql)."
        )


class LayerNaming(Rule):
    """A model's name says its layer: staging.stg_<source>__<entity>, intermediate.int_<purpose>,
    marts.<entity>_v<N>."""

    def check_model(self, model: Model) -> RuleViolation | None:
        if model.kind.is_external:
            return None
        schema, name = _schema_and_name(model)
        if schema not in LAYER_NAMES:
            return self.violation(
                f"{model.name}: a model lives in one of the schemas {', '.join(LAYER_NAMES)} (models/README.md)."
            )
        pattern, expected = LAYER_NAMES[schema]
        if pattern.fullmatch(name):
            return None
        return self.violation(f"{model.name}: a model of schema {schema} is named {schema}.{expected}.")
