"""Reconciliation: does the warehouse hold what the source holds? Row counts, key sets and per-range checksums.

``verify_pipeline`` compares every declared table (or ``tables``) of a pipeline with its source and locates a drift:
which keys are missing from the warehouse, which are extra, which rows differ, and in which key range.

How a table is read and compared, by kind:

- **SQL tables with a primary key** (merge, append, replace): the source is read in keyed chunks — ``WHERE key >
  last ORDER BY key LIMIT chunk_size``, each chunk a short query on the source's primary-key index, so tens of
  millions of rows never sit in memory nor hold a long transaction on the replica. The warehouse table is streamed
  in the same key order (one ordered server-side cursor) and merged with each chunk: per chunk, the key sets and a
  checksum of the compared columns on both sides. Compared columns: those present in the source and the warehouse,
  minus the primary key (compared as the key set), the personal columns (``hash``, ``drop``, ``year``: what the
  warehouse holds is derived from them, not equal to them; ``keep`` columns are compared), the soft-delete marker
  and dlt's own columns. Values are compared after conversion to the warehouse column's type (a SQLite text
  timestamp and a DuckDB timestamp are equal), timestamps in UTC.
- **Rows not loaded yet are not drift**: a source row whose cursor is beyond the last cursor value dlt recorded
  in the warehouse's state (``_dlt_pipeline_state``, minus the table's ``lag``) is *pending* (the next run loads
  it); it is counted, not compared. A row at or below that value missing from the warehouse is drift: no run
  reads it again (rows lost by a restore or a failover). Without a state, the warehouse's highest value stands
  in. Unless runs do not load the table: stopped (a source column gone, ``dropped.py``) or failing (the latest run
  that selected it failed without loading it, ``ops.pipeline_runs``): then it is drift with the reason, and every
  row is compared (nothing is pending). A column whose source type differs from the type it was loaded with (dlt's
  schema in the warehouse) is drift too. A soft-deleted source row must be absent from the warehouse. Keys deleted
  from the source stay in the warehouse by design when the table declares no ``deletes: {hard: key_set}``: they
  are counted as *kept*, not drift; with ``hard: key_set`` they are drift until the next run removes them (run,
  then verify).
- **History tables** (``history: scd2``): their current versions (``_dlt_valid_to`` null) are compared as above,
  one per key like the source; the retired versions are history, compared with nothing. ``full_compare`` compares
  the current versions of both loads.
- **Tables without a primary key**: row counts only (rows up to dlt's recorded cursor value).
- **File tables** (filesystem): the rows of the files currently in the bucket, read whole (dump files are small) in
  modification order, a later file's row replacing an earlier one with the same key (the merge's result), then
  compared by key range like SQL tables. Files removed from the bucket leave their rows in the warehouse (kept).
- **REST tables**: skipped, warehouse row count only. An API gives no keyed, ordered, bounded read: comparing would
  download the whole collection again at every check and spend the API's rate limit. Use ``--full-compare``.

``full_compare`` (``dlt pipeline <name> verify --full-compare --table T``) reloads one table from scratch into a
scratch dataset ``<dataset>_verify`` with the same code and declaration, diffs it with the incrementally
maintained table the same way (all columns but dlt's, personal pseudonyms included), then drops the scratch dataset.

Both take the pipeline's lock (a load changing the warehouse mid-comparison would look like drift).
"""

from __future__ import annotations

from datamart.ingest.verify.compare import compare_sorted
from datamart.ingest.verify.full import SCRATCH_SUFFIX, full_compare
from datamart.ingest.verify.report import DEFAULT_CHUNK, INTERNAL_PREFIXES, Key, RangeDrift, TableCheck, VerifyReport
from datamart.ingest.verify.tables import verify_pipeline, verify_table
from datamart.ingest.verify.values import checksum, coerce, differing_columns, row_digest, value_kind
from datamart.ingest.verify.warehouse_side import state_cursor, stored_state

__all__ = [
    "DEFAULT_CHUNK",
    "INTERNAL_PREFIXES",
    "SCRATCH_SUFFIX",
    "Key",
    "RangeDrift",
    "TableCheck",
    "VerifyReport",
    "checksum",
    "coerce",
    "compare_sorted",
    "differing_columns",
    "full_compare",
    "row_digest",
    "state_cursor",
    "stored_state",
    "value_kind",
    "verify_pipeline",
    "verify_table",
]
