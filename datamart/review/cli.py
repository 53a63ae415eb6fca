"""``python -m datamart review``: build the branch, print the report and say whether the change may be promoted."""

from __future__ import annotations

import sys
from pathlib import Path

from datamart.review.report import render
from datamart.review.run import DEFAULT_OUTPUT, run_review
from datamart.settings import Warehouse


def review_command(
    warehouse: Warehouse,
    environment: str | None = None,
    project: Path | None = None,
    output: Path | None = None,
    forward_only: bool = False,
) -> int:
    """``python -m datamart review``: print the Markdown report, write it to ``output``; 1 when refused, else 0."""
    result = run_review(warehouse, environment, project, forward_only)
    report = render(result)
    output = output or DEFAULT_OUTPUT
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report)
    sys.stdout.write(report)
    verdict = "passes" if result.passed else "REFUSED"
    shown = output.resolve()
    if shown.is_relative_to(Path.cwd()):
        shown = shown.relative_to(Path.cwd())
    print(
        f"review: {result.environment} {verdict} in {result.elapsed:.1f}s; report written to {shown}", file=sys.stderr
    )
    for violation in result.violations:
        print(f"error: {violation.message}", file=sys.stderr)
    return 0 if result.passed else 1
