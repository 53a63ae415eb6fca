"""``full_compare``: one table reloaded from scratch into ``<dataset>_verify`` and diffed with the incrementally
maintained one (``dlt pipeline <name> verify --full-compare --table T``)."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from datamart.ingest.declarations import PipelineDecl
from datamart.ingest.lock import pipeline_lock
from datamart.ingest.runner import run_pipeline
from datamart.ingest.verify.compare import compare_sorted
from datamart.ingest.verify.report import DEFAULT_CHUNK, INTERNAL_PREFIXES, TableCheck, VerifyReport
from datamart.ingest.verify.source_side import SourceRow, normalize
from datamart.ingest.verify.warehouse_side import table_count, warehouse_rows
from datamart.settings import Warehouse, quote_identifier

SCRATCH_SUFFIX = "_verify"  # one underscore: dlt normalises "__" in dataset names


def full_compare(
    decl: PipelineDecl,
    warehouse: Warehouse,
    table: str,
    chunk_size: int = DEFAULT_CHUNK,
    wait: float = 0.0,
    keep_scratch: bool = False,
) -> VerifyReport:
    """Reload ``table`` from scratch into the scratch dataset ``<dataset>_verify``, diff it with the incremental one.

    The scratch load runs the same declaration (personal treatment included) with its own dlt working dir and state,
    under the pipeline's lock; the scratch dataset and working dir are dropped afterwards (``keep_scratch`` keeps
    them to look at). Every column but dlt's is compared, the pseudonyms too.
    """
    started = time.monotonic()
    declared = decl.table(table)
    scratch = dataclasses.replace(decl, dataset=decl.dataset + SCRATCH_SUFFIX)
    name = normalize(declared.name)
    report = VerifyReport(
        pipeline=decl.name,
        dataset=decl.dataset,
        warehouse=warehouse.describe(),
        title=f"full compare (scratch reload into {scratch.dataset})",
    )
    work = Path(tempfile.mkdtemp(prefix=f"datamart-verify-{decl.name}-"))
    with pipeline_lock(warehouse, decl.name, wait=wait):
        try:
            _drop_dataset(warehouse, scratch.dataset)
            run_pipeline(scratch, warehouse, tables=[table], pipelines_dir=work, record=False)
            full_types = warehouse.columns(scratch.dataset, name)
            types = warehouse.columns(decl.dataset, name)
            check = TableCheck(
                table=declared.name,
                method="full reload",
                fix=f"dlt pipeline {decl.name} run --table {declared.name} --full-refresh",
            )
            if not types:
                check.method, check.source_rows, check.warehouse_rows = (
                    "not loaded",
                    table_count(warehouse, scratch.dataset, name),
                    0,
                )
            else:
                keys = [normalize(k) for k in declared.primary_key]
                columns = [
                    c for c in full_types if c in types and c not in keys and not c.startswith(INTERNAL_PREFIXES)
                ]
                check.columns = tuple(columns)
                merged_types = {**types, **{c: full_types[c] for c in full_types if c not in types}}
                if not keys:
                    check.method = "counts"
                    check.source_rows = table_count(warehouse, scratch.dataset, name)
                    check.warehouse_rows = table_count(warehouse, decl.dataset, name)
                else:
                    left = _chunked(
                        (
                            (key, "live", digest)
                            for key, digest in warehouse_rows(
                                warehouse, scratch.dataset, name, keys, columns, merged_types, declared.current_only
                            )
                        ),
                        chunk_size,
                    )
                    right = warehouse_rows(
                        warehouse, decl.dataset, name, keys, columns, merged_types, declared.current_only
                    )
                    compare_sorted(check, left, right, chunk_size, deletions_expected=True)
                    check.note = "source = a fresh full load; gone-from-source keys still in the table count as extra"
            report.tables.append(check)
        finally:
            if not keep_scratch:
                _drop_dataset(warehouse, scratch.dataset)
                shutil.rmtree(work, ignore_errors=True)
    report.elapsed = time.monotonic() - started
    return report


def _chunked(rows: Iterator[SourceRow], size: int) -> Iterator[list[SourceRow]]:
    chunk: list[SourceRow] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    yield chunk  # shorter than size: the last one


def _drop_dataset(warehouse: Warehouse, dataset: str) -> None:
    """Drop a scratch dataset and dlt's staging dataset beside it (merges stage rows in ``<dataset>_staging``)."""
    for schema in (dataset, f"{dataset}_staging"):
        warehouse.query(f"DROP SCHEMA IF EXISTS {quote_identifier(schema)} CASCADE")
