"""The whole job: (demo data) → every declared pipeline → SQLMesh prod plan → a short summary."""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from datamart.ingest.cli import failure_message, run_with_retries
from datamart.ingest.declarations import DeclarationError, PipelineDecl, load_all, load_named
from datamart.ingest.dropped import TablesStopped
from datamart.ingest.personal import HMAC_KEY_SECRET
from datamart.ingest.runner import PipelineRun, format_loads
from datamart.ingest.sources import bucket_url, source_credentials
from datamart.settings import PROJECT_ROOT, SettingsError, Warehouse, resolve_warehouse, secret
from datamart.transform import TransformRun, apply_prod


class RunFailed(RuntimeError):
    """A pipeline of the flow failed; the message names pipeline, step, table and what to do (cli.failure_message)."""


@dataclass
class PipelineFailure:
    """A pipeline that failed for good (after the retries of transient errors)."""

    decl: PipelineDecl
    error: BaseException

    def message(self) -> str:
        """Which pipeline and step failed, the root error and what to run (as ``dlt pipeline <name> run`` says)."""
        return failure_message(self.decl, self.error)


@dataclass
class FlowRun:
    """Everything one run did, for the summary and for tests."""

    warehouse: Warehouse
    pipelines: list[PipelineRun] = field(default_factory=list)
    transform: TransformRun | None = None
    elapsed: float = 0.0


def ensure_demo_secrets() -> bool:
    """Write a local ``.dlt/secrets.toml`` with a random HMAC key if there is none; True when written."""
    secrets_file = Path(os.environ.get("DLT_PROJECT_DIR") or PROJECT_ROOT) / ".dlt" / "secrets.toml"
    if secrets_file.exists() or secret(HMAC_KEY_SECRET):
        return False
    key = secrets.token_hex(32)
    text = (
        "# Written by `make run` for the local demo. Keep this key stable: it defines every pseudonym.\n"
        f'[datamart]\npii_hmac_key = "{key}"\n'
    )
    secrets_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # created 0600 in one call: never readable by others, not even between a write and a chmod
    fd = os.open(secrets_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    # dlt has already read its secret files in this process: hand it the new key the way it always looks.
    os.environ["DATAMART__PII_HMAC_KEY"] = key
    return True


def ensure_demo_data(out: TextIO, declarations: list[PipelineDecl] | None = None) -> None:
    """Generate the demo source (day 0) for the pipelines declared ``demo: true``, if it does not exist yet.

    Only those: a pipeline of the project's own (added, or replacing a demo one) reads its own source, which the demo
    never touches. No demo pipeline declared, nothing generated.
    """
    from datamart import demo

    declarations = load_all() if declarations is None else declarations
    app = next((d for d in declarations if d.demo and d.kind == "sql_database"), None)
    files = next((d for d in declarations if d.demo and d.kind == "filesystem"), None)
    if app is None and files is None:
        return
    # the half of the demo no pipeline reads is generated aside and thrown away, never into another pipeline's source
    with tempfile.TemporaryDirectory(prefix="datamart-demo-unused-") as unused:
        url = source_credentials(app, generating_demo=True) if app else f"sqlite:///{Path(unused) / 'app.sqlite'}"
        bucket = Path(bucket_url(files)) if files else Path(unused) / "bucket"
        exists = demo.source_exists(url) if app else bucket.is_dir() and any(bucket.iterdir())
        if exists:
            return
        names = ", ".join(d.name for d in (app, files) if d is not None)
        where = ", ".join(str(w) for w, d in ((url, app), (bucket, files)) if d is not None)
        print(f"demo: generating the demo source of pipeline(s) {names} ({where})", file=out)
        demo.generate(source_url=url, bucket=bucket)


def run_flow(
    warehouse: Warehouse | None = None,
    demo: bool = False,
    pipelines_dir: Path | None = None,
    out: TextIO = sys.stdout,
) -> FlowRun:
    """Run every pipeline then the prod plan; raise on the first failure (prod views stay as they were)."""
    started = time.monotonic()
    warehouse = warehouse or resolve_warehouse()
    if demo and any(d.demo for d in load_all()):  # only for pipelines that read the demo source
        if ensure_demo_secrets():
            print("demo: wrote .dlt/secrets.toml with a random pseudonymisation key", file=out)
        ensure_demo_data(out)
    flow = FlowRun(warehouse=warehouse)
    flow.pipelines, failures = run_pipelines(
        warehouse, pipelines_dir=pipelines_dir, keep_going=False, out=out, report_failures=False
    )
    if failures:
        error = failures[0].error
        if isinstance(error, DeclarationError | SettingsError):
            raise error
        raise RunFailed(failures[0].message() + "\nThe published views were not changed.") from error
    print("[sqlmesh] planning and applying prod", file=out)
    flow.transform = apply_prod(warehouse, command="run")
    flow.elapsed = time.monotonic() - started
    print(summary(flow), file=out)
    return flow


def run_pipelines(
    warehouse: Warehouse,
    pipelines_dir: Path | None = None,
    attempts: int = 3,
    backoff: float = 2.0,
    keep_going: bool = True,
    names: list[str] | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    report_failures: bool = True,
) -> tuple[list[PipelineRun], list[PipelineFailure]]:
    """Every declared pipeline, each with ``dlt pipeline <name> run``'s retries and backoff on transient errors.

    ``keep_going``: a failed pipeline does not stop the next ones (scheduled runs); otherwise stop at the first.
    ``names``: only these pipelines (an unknown name raises DeclarationError). The one loop shared by ``make run``
    and ``make scheduled``. ``report_failures``: print each failure's message to ``err`` (else the caller does).
    """
    declarations = [load_named(n) for n in names] if names else load_all()
    runs: list[PipelineRun] = []
    failures: list[PipelineFailure] = []
    for number, decl in enumerate(declarations, 1):
        print(f"[{number}/{len(declarations)}] loading pipeline {decl.name} → {decl.dataset}", file=out)
        try:
            run = run_with_retries(
                decl, warehouse, attempts=attempts, pipelines_dir=pipelines_dir, backoff=backoff, out=out, err=err
            )
        except Exception as exc:  # noqa: BLE001 - kept with its pipeline, reported by the caller
            if isinstance(exc, TablesStopped):
                runs.append(exc.run)  # its other tables were loaded: in the summary too
            failures.append(PipelineFailure(decl, exc))
            if report_failures:
                print(failures[-1].message(), file=err)
            if not keep_going:
                break
            continue
        print(f"      {run.rows_loaded} rows in {run.elapsed:.1f}s", file=out)
        runs.append(run)
    return runs, failures


def summary(flow: FlowRun) -> str:
    """The short report printed at the end of a run."""
    lines = ["", f"Done in {flow.elapsed:.1f}s. Warehouse: {flow.warehouse.describe()}", ""]
    lines.append(format_loads(flow.pipelines))
    transform = flow.transform
    if transform is not None:
        lines.append("")
        lines.append(transform.built_line())
        lines.append(f"Audits passed: {transform.audits_passed}")
        lines.append(f"Published views (what Metabase reads): {', '.join(transform.published_views)}")
        if transform.grants is not None:
            lines.append(transform.grants.format())
        business = [v for v in transform.published_views if "freshness" not in v] or transform.published_views
        if business:
            lines.append(f"Query one: {flow.warehouse.query_hint(business[0])}")
    return "\n".join(lines)
