"""File tables read in chunks (datamart/ingest/readers.py) load every row and value as the files hold them, and a
misspelt personal column of a file table (CSV and Parquet: by their headers; JSONL: by their records' keys, even
when the column first appears late in the file) is refused before anything is loaded. Through `dlt pipeline <name> run`,
into DuckDB and PostgreSQL. Memory itself is measured by `make bench` (file-load rows), not here.
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from datamart.ingest.personal import pseudonym
from datamart.ingest.readers import JSONL_SAMPLE
from datamart.settings import Warehouse
from datamart.testing.commands import dlt, environment

KEY = "file-chunks-test-key"
ROWS = 57  # with source.chunk_size 10: six chunks per file, the last one short
FILLER_IDS = 10_000  # the JSONL file's first records, without an e-mail


def _declare(folder: Path, personal: dict[str, str], only: str | None = None) -> None:
    table = {"write_disposition": "merge", "primary_key": "id", "cursor": "modification_date", "personal": personal}
    declaration = {
        "name": "files",
        "source": {"kind": "filesystem", "chunk_size": 10},
        "dataset": "raw_files",
        "tables": {
            "from_csv": {"files": "csv/*.csv", "format": "csv", **table},
            "from_parquet": {"files": "parquet/*.parquet", "format": "parquet", **table},
            "from_jsonl": {"files": "jsonl/*.jsonl", "format": "jsonl", **table},
        },
    }
    if only:
        declaration["tables"] = {only: declaration["tables"][only]}
    folder.mkdir(exist_ok=True)
    (folder / "files.yaml").write_text(yaml.safe_dump(declaration, sort_keys=False))


def _write_files(bucket: Path) -> list[dict[str, object]]:
    """A CSV and a Parquet file of the same rows; the rows as the warehouse must hold them (email hashed)."""
    rows = []
    for i in range(ROWS):
        rows.append(
            {
                "id": i,
                "email": f"person{i}@example.org",
                "count": i * 3,  # integers
                "score": None if i % 7 == 0 else i * 3,  # integers with empty fields: double, as pandas read them
                "amount": round(i * 1.25, 2),
                "active": i % 2 == 0,
                "day": f"2024-01-{1 + i % 28:02d}",  # a date stays text, as pandas read it
                "label": None if i % 5 == 0 else f"label {i}",
            }
        )
    (bucket / "csv").mkdir(parents=True)
    with open(bucket / "csv" / "rows.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: "" if v is None else str(v).lower() if isinstance(v, bool) else v for k, v in row.items()}
            )
    (bucket / "parquet").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), bucket / "parquet" / "rows.parquet", row_group_size=25)
    (bucket / "jsonl").mkdir()
    # JSON records have only the keys they have: the e-mail first appears after the records a first check reads
    filler = [{"id": FILLER_IDS + i, "count": i} for i in range(JSONL_SAMPLE)]
    (bucket / "jsonl" / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in filler + rows))
    return [{**row, "email": pseudonym(KEY.encode(), row["email"])} for row in rows]


def _run(tmp_path: Path, warehouse: Warehouse, declarations: Path) -> subprocess.CompletedProcess[str]:
    env = environment(
        ("DESTINATION__", "SOURCES__", "DATAMART_"),
        **warehouse.environment_variables(),
        DATAMART_DECLARATIONS_DIR=str(declarations),
        DATAMART_PIPELINES_DIR=str(tmp_path / "pipelines"),
        SOURCES__FILES__BUCKET_URL=str(tmp_path / "bucket"),
        DATAMART__PII_HMAC_KEY=KEY,
    )
    return dlt(env, "pipeline", "files", "run", timeout=300)


def test_chunked_file_loads_equal_the_files_row_for_row(warehouse: Warehouse, tmp_path: Path) -> None:
    expected = _write_files(tmp_path / "bucket")
    _declare(tmp_path / "declarations", {"email": "hash"})

    result = _run(tmp_path, warehouse, tmp_path / "declarations")
    assert result.returncode == 0, result.stdout + result.stderr

    columns = list(expected[0])
    for table in ("from_csv", "from_parquet", "from_jsonl"):
        loaded = warehouse.query(f"SELECT {', '.join(columns)} FROM raw_files.{table} WHERE id < {ROWS} ORDER BY id")
        assert [dict(zip(columns, row, strict=True)) for row in loaded] == expected, table
    assert warehouse.query(f"SELECT count(*) FROM raw_files.from_jsonl WHERE id >= {FILLER_IDS}") == [(JSONL_SAMPLE,)]
    types = dict(
        warehouse.query(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'raw_files' AND table_name = 'from_csv'"
        )
    )
    assert types["count"].lower() == "bigint" and types["score"].lower() in ("double", "double precision"), types
    assert types["day"].lower() in ("varchar", "text", "character varying"), types


def test_misspelt_personal_column_of_a_file_table_is_refused_before_anything_is_read(
    warehouse: Warehouse, tmp_path: Path
) -> None:
    _write_files(tmp_path / "bucket")
    _declare(tmp_path / "declarations", {"emial": "hash"})

    result = _run(tmp_path, warehouse, tmp_path / "declarations")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "files.yaml: tables.from_csv.personal.emial" in result.stderr, result.stderr
    assert "did you mean 'email'?" in result.stderr and "rows.csv" in result.stderr, result.stderr
    for table in ("from_csv", "from_parquet", "from_jsonl"):
        assert not warehouse.table_exists("raw_files", table), f"nothing loaded ({table})"

    # a JSONL table alone: its records' keys are read (all of them, the e-mail appearing late), none loaded
    _declare(tmp_path / "declarations", {"emial": "hash"}, only="from_jsonl")
    result = _run(tmp_path, warehouse, tmp_path / "declarations")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "files.yaml: tables.from_jsonl.personal.emial" in result.stderr, result.stderr
    assert "did you mean 'email'?" in result.stderr and "rows.jsonl" in result.stderr, result.stderr
    assert not warehouse.table_exists("raw_files", "from_jsonl"), "nothing loaded"
