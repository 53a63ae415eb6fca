"""A copy of the SQLMesh project in a temporary folder: a branch under review, or a project a test breaks."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from sqlmesh.utils.errors import NodeAuditsErrors

from datamart.settings import PROJECT_ROOT

SQLMESH_FILES = {"config.py", "linter", "external_models.yaml", "retired_views.yaml", "models", "audits", "macros"}


def copy_project(destination: Path, unit_tests: bool = False) -> Path:
    """Copy what SQLMesh reads (config, models, audits, macros, external models; ``unit_tests``: tests/*.yaml)."""
    keep = SQLMESH_FILES | ({"tests"} if unit_tests else set())

    def ignore(folder: str, names: list[str]) -> set[str]:
        if Path(folder) == PROJECT_ROOT:
            return {n for n in names if n not in keep}
        if Path(folder) == PROJECT_ROOT / "tests":
            return {n for n in names if not n.endswith(".yaml")}
        return {n for n in names if n in ("__pycache__", ".cache")}

    shutil.copytree(PROJECT_ROOT, destination, ignore=ignore)
    return destination


def edit(project: Path, relative: str, old: str, new: str) -> None:
    """Replace ``old`` (which must appear exactly once) by ``new`` in the project's file ``relative``."""
    path = project / relative
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} is not found exactly once in {relative}"
    path.write_text(text.replace(old, new))


def failed_audits(records: list[logging.LogRecord]) -> set[str]:
    """The audits SQLMesh's scheduler logged as failed (a plan's error only says "Plan application failed.")."""
    names = set()
    for record in records:
        error = record.exc_info[1] if record.exc_info else None
        while error is not None:
            if isinstance(error, NodeAuditsErrors):
                names.update(audit.audit_name for audit in error.errors)
            error = error.__cause__
    return names
