"""The scheduled run (``python -m datamart scheduled``, ``make scheduled``): what cron, a CronJob or Airflow runs.

Steps, in order (:data:`STEPS`): every declared pipeline (with ``dlt pipeline <name> run``'s retries), then the
repair of the pipelines declaring ``verify: repair`` (``dlt pipeline <name> verify --repair``), then the
refresh of prod's published views from what was loaded (the same refresh ``make run`` and ``make promote`` end with)
— never a promotion: new model versions reach prod through ``make promote`` from a merged pull request.
A step runs only when every step before it succeeded (models never process an interval whose raw data failed to
load). Exit code 0 when every step succeeded, 1 when one failed, 2 on bad input (settings,
declarations, the wrong environment's warehouse). A failure posts an alert to the webhook when one is configured.

Adding a step: write ``def my_step(run: ScheduledRun) -> list[StepResult]`` and append it to :data:`STEPS`; its
name (the function's) can be selected with ``--only``/``--skip``. Raise, or return a result with ``ok=False``, to fail.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from datamart.alerts import AlertError, post_alert, redact, webhook_url
from datamart.errors import is_transient, root_cause
from datamart.flow import run_pipelines
from datamart.ingest.declarations import DeclarationError, load_all, load_named
from datamart.ingest.runner import PipelineRun, format_loads
from datamart.settings import SettingsError, Warehouse


@dataclass
class StepResult:
    """One line of the summary: a pipeline or a step, what it did or why it failed, and what to run then."""

    step: str  # the step function's name: pipelines, refresh, …
    ok: bool
    detail: str = ""
    pipeline: str | None = None
    phase: str | None = None  # where it failed inside the step (dlt's extract/normalize/load)
    error: str | None = None
    command: str | None = None  # what to run after fixing the cause
    skipped: bool = False
    notes: list[str] = field(default_factory=list)  # printed under the line

    @property
    def label(self) -> str:
        """``pipeline app_db`` (the pipelines step), ``<step> app_db`` (another step, per pipeline) or the step."""
        step = self.step.replace("_", " ")
        if self.pipeline:
            return f"pipeline {self.pipeline}" if self.step == "pipelines" else f"{step} {self.pipeline}"
        return step


@dataclass
class ScheduledRun:
    """The state handed to every step, and what the steps reported."""

    warehouse: Warehouse
    pipelines_dir: Path | None = None
    attempts: int = 3
    backoff: float = 2.0
    out: TextIO = sys.stdout
    err: TextIO = sys.stderr
    execution_time: str | None = None  # SQLMesh's "now" (catch up a missed day); None: the clock
    pipeline_names: list[str] | None = None  # only these pipelines (an Airflow task per pipeline); None: all
    results: list[StepResult] = field(default_factory=list)
    loads: list[PipelineRun] = field(default_factory=list)
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    elapsed: float = 0.0
    alert: str = ""

    @property
    def failures(self) -> list[StepResult]:
        """The results that failed."""
        return [r for r in self.results if not r.ok and not r.skipped]


Step = Callable[[ScheduledRun], list[StepResult]]


def pipelines(run: ScheduledRun) -> list[StepResult]:
    """Every declared pipeline; a failed one does not stop the others (same loop and retries as ``make run``)."""
    loads, failures = run_pipelines(
        run.warehouse,
        pipelines_dir=run.pipelines_dir,
        attempts=run.attempts,
        backoff=run.backoff,
        keep_going=True,
        names=run.pipeline_names,
        out=run.out,
        err=run.err,
    )
    run.loads.extend(loads)
    order = {name: number for number, name in enumerate(run.pipeline_names or [d.name for d in load_all()])}
    results = [
        StepResult(
            "pipelines",
            True,
            f"{len(load.tables)} tables, {load.rows_loaded:,} rows, {load.elapsed:.1f}s",
            pipeline=load.pipeline,
        )
        for load in loads
    ]
    for failure in failures:
        name = failure.decl.name
        hint = "check the connection, then" if is_transient(failure.error) else "fix the cause, then"
        results.append(
            StepResult(
                "pipelines",
                False,
                pipeline=name,
                phase=getattr(failure.error, "step", None),
                error=root_cause(failure.error),
                command=f"{hint} `dlt pipeline {name} run` (each table is applied whole or not at all)",
            )
        )
    return sorted(results, key=lambda result: order.get(result.pipeline or "", len(order)))


def repair(run: ScheduledRun) -> list[StepResult]:
    """``dlt pipeline <name> verify --repair`` for each pipeline declaring ``verify: repair``, before the refresh so
    that the published views take in the repaired rows: drift left after the repair fails the step."""
    from datamart.ingest.repair import repair_pipeline

    declared = [load_named(n) for n in run.pipeline_names] if run.pipeline_names else load_all()
    results = []
    for decl in (d for d in declared if d.repair):
        try:
            report = repair_pipeline(decl, run.warehouse, pipelines_dir=run.pipelines_dir)
        except (SettingsError, DeclarationError):
            raise
        except Exception as exc:  # noqa: BLE001 - this pipeline's line says why; the next pipelines are repaired
            command = f"fix the cause, then `dlt pipeline {decl.name} verify --repair`"
            results.append(StepResult("repair", False, pipeline=decl.name, error=root_cause(exc), command=command))
            continue
        print(report.format(), file=run.out)
        repaired = [f"{t.table} ({t.rewritten:,} rows rewritten, {t.deleted:,} deleted)" for t in report.tables]
        if report.drift:
            drifted = [t.table for t in (report.after or report.before).tables if t.drift]
            results.append(
                StepResult(
                    "repair",
                    False,
                    pipeline=decl.name,
                    error=f"the warehouse still differs from the source in {', '.join(drifted)} (report above)",
                    command=f"the fix the report names, then `dlt pipeline {decl.name} verify --repair`",
                )
            )
        elif repaired:
            results.append(StepResult("repair", True, f"repaired {'; '.join(repaired)}", pipeline=decl.name))
        else:
            results.append(StepResult("repair", True, f"{len(report.before.tables)} tables match", pipeline=decl.name))
    return results


def refresh(run: ScheduledRun) -> list[StepResult]:
    """Bring prod's published views up to the raw tables (``datamart.transform.refresh_prod``), promoting nothing.

    The same refresh as ``make run`` and ``make promote`` end with: the models reading a raw table loaded since the
    last refresh are restated, after SQLMesh's run of prod's due intervals.
    """
    from datamart.gate.published import PublishedGateError
    from datamart.transform import NeverPromoted, refresh_prod

    try:
        done = refresh_prod(run.warehouse, execution_time=run.execution_time)
    except PublishedGateError as exc:  # published past the gate: taken away from Metabase, the run stops
        return [
            StepResult(
                "refresh",
                False,
                error=str(exc),
                command="restore or fix the models the lines name, then `make review` and `make promote`",
            )
        ]
    except NeverPromoted as exc:
        return [
            StepResult(
                "refresh", False, error=str(exc).split(": ")[0], command="`make promote` once, then the scheduled run"
            )
        ]
    notes = []
    if done.differs:
        shown = ", ".join(done.differs[:3]) + (f" and {len(done.differs) - 3} more" if len(done.differs) > 3 else "")
        notes = [
            f"the project differs from prod ({shown}): NOT promoted, prod refreshed its own versions;",
            "`make promote` applies the project (normally once the pull request is merged)",
        ]
    parts = []
    if done.models_restated:
        shown = ", ".join(done.models_restated[:4]) + (
            f" and {len(done.models_restated) - 4} more" if len(done.models_restated) > 4 else ""
        )
        parts.append(f"{len(done.models_restated)} models rebuilt from new data ({shown})")
    if done.ran_due_intervals:
        parts.append("prod's due intervals processed")
    detail = "; ".join(parts) or "the published views already reflect every load"
    return [StepResult("refresh", True, f"{detail}, {done.elapsed:.1f}s", notes=notes)]


def reconcile(run: ScheduledRun) -> list[StepResult]:
    """``dlt pipeline <name> verify`` for each pipeline declaring ``verify: true``: drift fails the step (those
    declaring ``verify: repair`` were verified by the repair step)."""
    from datamart.ingest.verify import verify_pipeline

    declared = [load_named(n) for n in run.pipeline_names] if run.pipeline_names else load_all()
    results = []
    for decl in (d for d in declared if d.verify and not d.repair):
        report = verify_pipeline(decl, run.warehouse)
        if report.drift:
            print(report.format(), file=run.out)
            drifted = [t.table for t in report.tables if t.drift]
            results.append(
                StepResult(
                    "reconcile",
                    False,
                    pipeline=decl.name,
                    error=f"the warehouse differs from the source in {', '.join(drifted)} (report above)",
                    command=f"`dlt pipeline {decl.name} verify` to see it again; the report says what reloads it",
                )
            )
        else:
            results.append(StepResult("reconcile", True, f"{len(report.tables)} tables match", pipeline=decl.name))
    return results


REVIEW_PREFIX = "pr_"  # the environments `make review` builds (datamart/review/run.py: pr_<branch>)


def environments(run: ScheduledRun) -> list[StepResult]:
    """Review environments (``pr_*``) of merged pull requests, or holding their own copy of data, are invalidated;
    then SQLMesh's janitor drops what no environment uses any more (views, schemas, tables).

    Which ones go, decided from the warehouse's SQLMesh state alone (the scheduled job runs from an image without
    git history, so "merged into main" cannot be asked of git there, and an age would keep an erased person's rows
    for that long):

    - every version the environment holds is prod's: its pull request was merged and promoted (or it changed
      nothing); removing it loses nothing, prod serves the same tables;
    - it holds its own materialised table (a changed model that is not a view): the scheduled run refreshes prod's
      tables only, so that copy would keep rows deleted at the source since, an erased person's among them. Its
      review report is already on the pull request; the next push (``make review``) builds it again.

    An environment whose own versions are all views (they read the raw tables, hence never outlive a deletion) is
    kept for its reviewers; SQLMesh's ``environment_ttl`` expires it a week after its last plan.
    """
    from sqlmesh.core.model.kind import ModelKindName

    from datamart.transform import sqlmesh_context

    no_copy = {ModelKindName.VIEW, ModelKindName.EMBEDDED, ModelKindName.EXTERNAL, ModelKindName.SEED}
    context = sqlmesh_context(run.warehouse)
    try:
        prod = context.state_reader.get_environment("prod")
        in_prod = {s.snapshot_id for s in prod.snapshots} if prod else set()
        invalidated = []
        for environment in sorted(context.state_reader.get_environments(), key=lambda e: e.name):
            if not environment.name.startswith(REVIEW_PREFIX):
                continue
            own = [s for s in environment.snapshots if s.snapshot_id not in in_prod]
            copies = sorted(s.name.split(".")[-1].strip('"') for s in own if s.kind_name not in no_copy)
            if own and not copies:
                continue
            reason = f"holds its own copy of {', '.join(copies)}" if copies else "merged: every version is prod's"
            context.invalidate_environment(environment.name)
            invalidated.append(f"{environment.name} ({reason})")
        # The janitor, without TTL: a table no environment uses (an invalidated review's copy) is dropped now, not a
        # week later; called directly because Context.run_janitor(ignore_ttl=True) asks for a confirmation.
        context._run_janitor(ignore_ttl=True)
    finally:
        context.close()
    done = f"invalidated {len(invalidated)} review environment(s), janitor run" if invalidated else "janitor run"
    return [StepResult("environments", True, done, notes=invalidated)]


def replication_slots(run: ScheduledRun) -> list[StepResult]:
    """Each replication pipeline's slot measured on its source (``datamart/ingest/slots.py``): a slot retaining more
    WAL than the pipeline's ``source.max_retained_wal`` fails the step, so the run alerts before the source's disk
    fills. Last, so that a slot over the threshold never holds back the refresh of the published views."""
    from datamart.ingest.recopy import slot_warnings
    from datamart.ingest.replication import connect_source, is_replication, object_name
    from datamart.ingest.slots import max_retained_wal, measure, over_threshold_hint, wal_status

    declared = [load_named(n) for n in run.pipeline_names] if run.pipeline_names else load_all()
    results = []
    for decl in (d for d in declared if is_replication(d)):
        # a slot this run's pipelines step found lost and recreated (every table copied again): alerted once
        for warning in (w for load in run.loads if load.pipeline == decl.name for w in slot_warnings(load)):
            command = f"nothing to recover (the run did); `dlt pipeline {decl.name} verify` confirms it"
            error = warning.removeprefix("WARNING: ")
            results.append(StepResult("replication_slots", False, pipeline=decl.name, error=error, command=command))
        try:
            conn = connect_source(decl)
            try:
                status = measure(conn, object_name(decl, "slot"), max_retained_wal(decl))
                lost = wal_status(conn, object_name(decl, "slot")) == "lost"
            finally:
                conn.close()
        except (SettingsError, DeclarationError):
            raise
        except Exception as exc:  # noqa: BLE001 - this pipeline's line says why; the next slots are measured
            command = f"check that the source of {decl.name} is reachable, then `make scheduled`"
            results.append(
                StepResult("replication_slots", False, pipeline=decl.name, error=root_cause(exc), command=command)
            )
            continue
        if lost:  # no run since the source invalidated it (a run recreates it and copies every table again)
            error = (
                f"slot {object_name(decl, 'slot')!r} was invalidated by the source (wal_status lost: it kept more WAL "
                "than max_slot_wal_keep_size allows): the changes since the last run are gone"
            )
            command = f"`dlt pipeline {decl.name} run`: it creates a new slot and copies every table whole again"
            results.append(StepResult("replication_slots", False, pipeline=decl.name, error=error, command=command))
        elif status is None:
            detail = f"no slot {object_name(decl, 'slot')!r} on the source (the next run creates it)"
            results.append(StepResult("replication_slots", True, detail, pipeline=decl.name))
        elif status.over:
            results.append(
                StepResult(
                    "replication_slots",
                    False,
                    pipeline=decl.name,
                    error=status.describe().removeprefix("WARNING: "),
                    command=over_threshold_hint(decl.name, status),
                )
            )
        else:
            results.append(StepResult("replication_slots", True, status.describe(), pipeline=decl.name))
    return results


# The scheduled run, in order.
STEPS: list[Step] = [pipelines, repair, refresh, environments, reconcile, replication_slots]


def step_names() -> list[str]:
    """The names ``--only`` and ``--skip`` accept."""
    return [step.__name__ for step in STEPS]


def run_scheduled(
    warehouse: Warehouse,
    steps: list[Step] | None = None,
    pipelines_dir: Path | None = None,
    attempts: int = 3,
    backoff: float = 2.0,
    execution_time: str | None = None,
    pipeline_names: list[str] | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> ScheduledRun:
    """Run ``steps`` (default :data:`STEPS`) in order; a step runs only if every earlier one succeeded."""
    monotonic = time.monotonic()
    run = ScheduledRun(warehouse, pipelines_dir, attempts, backoff, out, err, execution_time, pipeline_names)
    load_all()  # every declaration is valid before anything runs (DeclarationError: bad input)
    for name in pipeline_names or []:
        load_named(name)
    for step in STEPS if steps is None else steps:
        name = step.__name__
        if run.failures:
            blocked = ", ".join(sorted({f.label for f in run.failures}))
            run.results.append(StepResult(name, False, f"skipped: {blocked} failed", skipped=True))
            continue
        print(f"[{name.replace('_', ' ')}]", file=out)
        try:
            run.results.extend(step(run))
        except (SettingsError, DeclarationError):
            raise
        except Exception as exc:  # noqa: BLE001 - reported in the summary and the alert, exit code 1
            run.results.append(
                StepResult(name, False, error=root_cause(exc), command="fix the cause, then `make scheduled`")
            )
    run.elapsed = time.monotonic() - monotonic
    return run


def warehouse_unreachable(warehouse: Warehouse, error: BaseException) -> ScheduledRun:
    """The run that could not start because the warehouse did not answer: one failed line, every step not run."""
    run = ScheduledRun(warehouse)
    run.results.append(
        StepResult(
            "warehouse",
            False,
            error=root_cause(error),
            command="check that the warehouse is up and reachable with these credentials, then `make scheduled`",
        )
    )
    run.results += [
        StepResult(step.__name__, False, "skipped: the warehouse did not answer", skipped=True) for step in STEPS
    ]
    return run


def summary(run: ScheduledRun) -> str:
    """One screen for a cron log: environment, warehouse, one line per pipeline and step, the result."""
    failed = run.failures
    lines = [
        f"datamart scheduled run, {run.warehouse.environment}: {run.warehouse.describe()}",
        f"started {run.started:%Y-%m-%d %H:%M:%S} UTC, {run.elapsed:.1f}s",
        "",
    ]
    # labels are padded to the longest one: a long pipeline name never runs into its detail
    width = max([24] + [len(result.label) + 2 for result in run.results])
    for result in run.results:
        status = "skipped" if result.skipped else "ok" if result.ok else "FAILED"
        text = result.detail if result.ok or result.skipped else _failure_text(result)
        lines.append(f"  {status:<8}{result.label:<{width}}{text}")
        if not result.ok and not result.skipped and result.command:
            lines.append(f"  {'':<8}{'':<{width}}what to run: {result.command}")
        lines += [f"  {'':<8}{'':<{width}}{note}" for note in result.notes]
    if run.loads:
        lines += ["", *_table_lines(run.loads)]
    lines += ["", f"result: {'FAILED' if failed else 'ok'}" + (f", {run.alert}" if run.alert else "")]
    return redact("\n".join(lines))


def _table_lines(loads: list[PipelineRun], most: int = 12) -> list[str]:
    """The per-table counts; past ``most`` tables, only those that changed (the summary stays one screen)."""
    if sum(len(load.tables) for load in loads) <= most:
        return [format_loads(loads)]
    changed = [
        replace(load, tables=[t for t in load.tables if t.rows_loaded or t.rows_deleted or t.soft_deleted])
        for load in loads
    ]
    unchanged = sum(len(load.tables) for load in loads) - sum(len(load.tables) for load in changed)
    return [format_loads(changed), f"({unchanged} unchanged tables not listed)"]


def _failure_text(result: StepResult) -> str:
    phase = f"at {result.phase}: " if result.phase else ""
    return f"{phase}{result.error}"


def alert_text(run: ScheduledRun) -> str:
    """The short message posted on failure: environment, each failed pipeline/step, its error, what to run."""
    lines = [f"datamart scheduled run FAILED ({run.warehouse.environment}, {run.warehouse.describe()})"]
    for result in run.failures:
        step = result.step.replace("_", " ") + (f" ({result.phase})" if result.phase else "")
        who = f"pipeline {result.pipeline}, step {step}" if result.pipeline else f"step {step}"
        lines.append(f"- {who}: {result.error}")
        if result.command:
            lines.append(f"  what to run: {result.command}")
    skipped = [r.label for r in run.results if r.skipped]
    if skipped:
        lines.append(f"- not run: {', '.join(skipped)}")
    lines.append(f"Then rerun: make scheduled (DATAMART_ENV={run.warehouse.environment})")
    return redact("\n".join(lines))


def send_alert(run: ScheduledRun) -> None:
    """Post :func:`alert_text` when a step failed and a webhook is configured; note the outcome in ``run.alert``."""
    if not run.failures:
        return
    url = webhook_url()
    if not url:
        run.alert = "no alert sent (no datamart.alert_webhook_url configured)"
        return
    try:
        post_alert(url, alert_text(run))
        run.alert = "alert posted to the webhook"
    except AlertError as exc:
        run.alert = f"ALERT NOT SENT: {exc}"


def send_input_alert(environment: str, error: BaseException) -> str:
    """On bad input (exit 2) the scheduled run stops before any step: alert with the error; returns the outcome."""
    url = webhook_url()
    if not url:
        return "no alert sent (no datamart.alert_webhook_url configured)"
    text = redact(
        f"datamart scheduled run FAILED before any step ({environment}): {error}\n"
        f"what to run: fix the setting or declaration named above, then `make scheduled` (DATAMART_ENV={environment})"
    )
    try:
        post_alert(url, text)
    except AlertError as exc:
        return f"ALERT NOT SENT: {exc}"
    return "alert posted to the webhook"
