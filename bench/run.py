"""The benchmark: our loads against PostgreSQL's own COPY and the dump/restore they replace, on the same machine.

``make bench`` (or ``.venv/bin/python bench/run.py --scale 500``) starts a throwaway PostgreSQL cluster, generates the
demo source in it, then measures in one run:

1. the physical baseline, ``psql \\copy … to stdout | psql \\copy … from stdin`` per table;
2. ``pg_dump`` of the source tables piped into ``pg_restore`` (the nightly copy being replaced);
3. our full initial load (``dlt pipeline app_db run``, fresh state) into PostgreSQL and into DuckDB;
4. SQLMesh: the first prod build, then ``sqlmesh plan`` with no change;
5. an incremental run after exactly 1 % of each table's rows changed (updates, inserts, deletes; new events);
6. the SQLMesh promotion after that incremental load (``python -m datamart promote``: the one refresh path), also as a
   share of the first prod build (the datamart alone) and, with the load, of the full load + first build (end to end);
7. a run with no change at all;
8. key-set delete detection over the biggest table's keys (stats_events), as the runner does it (the comparison
   itself is also timed inside its process, without Python's start, for its target);
9. file loads into DuckDB (``dlt pipeline bench_files run``): one CSV and one Parquet file of about 200 MB each
   at scale 500 (2.6 M rows; the size follows the scale).

Every measured command runs as its own subprocess tree: wall time, and peak RSS of the biggest process in it
(``ru_maxrss`` of the waited-for children). The table is printed and written as Markdown and JSON
(``--output bench/results/latest`` → ``latest.md`` and ``latest.json``). The cluster and every temporary file are
removed at the end, also on Ctrl-C. The replication-mode rows load into a second cluster (a slot decodes every
WAL record of its server: a warehouse on the source's cluster would make it decode the warehouse's own writes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from datamart.testing.postgres import ThrowawayPostgres, create_database  # noqa: E402

RESULTS_DIR = PROJECT_ROOT / "bench" / "results"  # the committed figures of the last run

TABLES = ("organizations", "missions", "volunteers", "applications", "stats_events")
MERGE_TABLES = ("organizations", "missions", "volunteers", "applications")
SOFT_DELETED = ("organizations", "missions")  # deletes: {soft: deleted_at} in pipelines/app_db.yaml
CHANGED_SHARE = 0.01
GIB = 1024**3

# Every step the report has, in order: (key, label). The tiny-scale test checks each one is present.
STEPS = (
    ("copy", "COPY baseline (psql \\copy | psql \\copy)"),
    ("dump_restore", "pg_dump | pg_restore"),
    ("full_postgres", "full load → PostgreSQL (dlt pipeline app_db run)"),
    ("full_duckdb", "full load → DuckDB (dlt pipeline app_db run)"),
    ("sqlmesh_first_build", "SQLMesh first prod build (PostgreSQL)"),
    ("sqlmesh_plan_no_change", "sqlmesh plan prod, no change"),
    ("incremental_postgres", "incremental, 1 % changed → PostgreSQL"),
    ("sqlmesh_after_incremental", "SQLMesh promotion after the incremental load"),
    ("no_change_postgres", "no-change run → PostgreSQL"),
    ("key_set_deletes", "key-set delete detection, stats_events keys"),
    ("replication_copy", "replication mode: first run (slot, publication, copy) → PostgreSQL"),
    ("replication_after_change", "replication mode: run after 1 % changed → PostgreSQL"),
    ("file_csv_duckdb", "file load, CSV → DuckDB (dlt pipeline bench_files run)"),
    ("file_parquet_duckdb", "file load, Parquet → DuckDB (dlt pipeline bench_files run)"),
)
FILE_ROWS_AT_500 = 2_600_000  # rows of each benchmark file at scale 500: a CSV of about 200 MB
# The benchmark files: a CSV export as partners send them (numbers, timestamps as text, e-mails to hash), and the
# same rows in Parquet with a random token, uncompressed, so that the file is about as big as the CSV (263 MB).
FILE_ROWS_SQL = """
SELECT i AS id, TIMESTAMP '2024-01-01' + INTERVAL (i) SECOND AS created_at, 'user' || i || '@example.org' AS email,
       'Name ' || (i * 7919 % 100000) AS name, round((i * 37 % 100000) / 100.0, 2) AS amount,
       ['Paris', 'Lyon', 'Marseille', 'Lille', 'Nantes'][1 + i % 5] AS city,
       CASE WHEN i % 3 = 0 THEN 'active' WHEN i % 3 = 1 THEN 'pending' ELSE 'closed' END AS status{extra}
FROM range({rows}) t(i)
"""
FILES_DECLARATION = """\
name: bench_files
source:
  kind: filesystem
dataset: raw_bench_files
tables:
  csv_rows:
    files: csv/*.csv
    format: csv
    write_disposition: merge
    primary_key: id
    cursor: modification_date
    personal: {email: hash}
  parquet_rows:
    files: parquet/*.parquet
    format: parquet
    write_disposition: merge
    primary_key: id
    cursor: modification_date
    personal: {email: hash}
"""

_WRAPPER = """
import resource, subprocess, sys, json, time
started = time.monotonic()
code = subprocess.run(sys.argv[2:]).returncode
elapsed = time.monotonic() - started
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as out:
    cpu = usage.ru_utime + usage.ru_stime
    json.dump({"code": code, "seconds": elapsed, "rss_kb": usage.ru_maxrss, "cpu": cpu}, out)
sys.exit(code)
"""


@dataclass
class Step:
    """One measured command."""

    key: str
    label: str
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # user + system time of the client processes (not the database server's)
    rows: int = 0
    peak_rss_mb: float = 0.0
    rows_per_s: float = 0.0
    ratio_to_copy: float | None = None  # rows/s of this step / rows/s of the COPY baseline
    profile: dict[str, float] = field(default_factory=dict)  # extract/normalize/load… seconds, from the run summary
    note: str = ""


class Bench:
    """The state of one benchmark run: the cluster, the databases, the environment of the commands."""

    def __init__(self, scale: float, work: Path, out: Any = sys.stdout) -> None:
        self.scale = scale
        self.work = work
        self.out = out
        self.steps: dict[str, Step] = {}
        # wal_level=logical: the replication-mode rows read the source by logical decoding (the cursor rows do not
        # need it; it adds a little WAL to every write of the source, not to what the loads read)
        self.server = ThrowawayPostgres(wal_level="logical")
        # The replication row's warehouse runs on a cluster of its own, as it would in production: a logical slot
        # reads every WAL record of its server, so a warehouse on the source's cluster would make the run after
        # the change decode the copy it wrote (2.9 GB of WAL at scale 500: 117 s of a run that loaded in 6.5 s).
        # Created once the first one listens, so that both cannot pick the same free port.
        self.replica_server: ThrowawayPostgres | None = None
        self.bin = self.server.bin_dir
        self.counts: dict[str, int] = {}
        self.file_sizes: dict[str, int] = {}  # bytes of the benchmark files (file_loads)

    # -- helpers ------------------------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        """A progress line, with the time of day."""
        print(f"[{datetime.now().strftime('%H:%M:%S')}] {text}", file=self.out, flush=True)

    def measure(self, key: str, command: list[str], rows: int, env: dict[str, str] | None = None) -> Step:
        """Run ``command`` through the measuring wrapper; record wall time and peak RSS; raise when it fails."""
        label = dict(STEPS)[key]
        self.say(f"{label} …")
        result_file = self.work / f"{key}.json"
        log = self.work / f"{key}.log"
        with open(log, "w") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-c", _WRAPPER, str(result_file), *command],
                env=env or self.env(),
                cwd=PROJECT_ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: a step stopped by the watchdog takes its children
            )
            code = self.watch(key, label, process)
        if code != 0:
            tail = "\n".join(log.read_text().splitlines()[-40:])
            raise RuntimeError(f"{label} failed (exit {code}): {shlex.join(command)}\n{tail}")
        measured = json.loads(result_file.read_text())
        step = Step(key=key, label=label, seconds=measured["seconds"], rows=rows)
        step.peak_rss_mb = measured["rss_kb"] / 1024
        step.cpu_seconds = measured["cpu"]
        step.rows_per_s = rows / step.seconds if step.seconds and rows else 0.0
        step.profile = parse_profile(log.read_text())
        self.steps[key] = step
        profile = ", ".join(f"{k} {v:.1f}s" for k, v in step.profile.items())
        self.say(
            f"  {step.seconds:.1f}s (client CPU {step.cpu_seconds:.1f}s), {rows:,} rows, "
            f"{step.rows_per_s:,.0f} rows/s, peak RSS {step.peak_rss_mb:.0f} MB" + (f" ({profile})" if profile else "")
        )
        return step

    def watch(self, key: str, label: str, process: subprocess.Popen[bytes]) -> int:
        """Wait for a step; say so when it runs far past its last figure (``LATE`` times the last run's seconds,
        scaled to this run's size), with what the database server is running; stop it past ``GIVE_UP`` times.

        A bench that waits for ever measures nothing: on 1 Dec a first build planned before the raw tables had
        statistics sat in one statement for more than 6 minutes where it had taken 102 s."""
        expected = expected_seconds(key, self.scale)
        warned = False
        started = time.monotonic()
        while True:
            try:
                return process.wait(timeout=min(5.0, LATE_FLOOR))
            except subprocess.TimeoutExpired:
                pass
            elapsed = time.monotonic() - started
            if expected is None:
                continue
            if not warned and elapsed > max(LATE * expected, LATE_FLOOR):
                warned = True
                self.say(
                    f"  {label}: {elapsed:.0f}s, more than {LATE}× its last figure ({expected:.0f}s at this scale); "
                    f"the server is running: {self.running_statements()}"
                )
            if elapsed > max(GIVE_UP * expected, GIVE_UP_FLOOR):
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise RuntimeError(
                    f"{label} stopped after {elapsed:.0f}s, {GIVE_UP}× its last figure ({expected:.0f}s at this "
                    f"scale): a step that far off is a defect to find (a plan without statistics, a quadratic "
                    f"query), not a figure. The server was running: {self.running_statements()}"
                )

    def running_statements(self) -> str:
        """The statements active on the bench's servers (``pg_stat_activity``), for a step that runs late."""
        found = []
        for server in (self.server, self.replica_server):
            if server is None:
                continue
            try:
                rows = self.psql(
                    server.url(),
                    "SELECT datname || ': ' || round(extract(epoch FROM now() - query_start)) || 's ' || "
                    "left(regexp_replace(query, '\\s+', ' ', 'g'), 160) FROM pg_stat_activity "
                    "WHERE state = 'active' AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
                )
            except Exception as exc:  # noqa: BLE001 - a look at the server, never the reason a bench fails
                rows = f"(could not ask: {exc})"
            found += [line for line in rows.splitlines() if line.strip()]
        return "; ".join(found) or "nothing (the time is spent in the client)"

    def psql(self, url: str, statement: str) -> str:
        """Run one statement with psql; return its unaligned output."""
        result = subprocess.run(
            [str(self.bin / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", statement],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {statement}\n{result.stderr}")
        return result.stdout.strip()

    def env(self, target: str = "postgres") -> dict[str, str]:
        """The environment of a datamart command: isolated project settings, this run's source and warehouse."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("DESTINATION__", "SOURCES__", "DATAMART_", "SQLMESH__"))
        }
        env.update(
            DLT_PROJECT_DIR=str(self.project),
            DATAMART_PIPELINES_DIR=str(self.work / "pipelines"),
            SOURCES__APP_DB__CREDENTIALS=self.source_url,
            SOURCES__BUCKET__BUCKET_URL=str(self.work / "bucket"),
            DATAMART__PII_HMAC_KEY="benchmark-key",
            RUNTIME__DLTHUB_TELEMETRY="false",
            DATAMART_TARGET=target,
            PYTHONUNBUFFERED="1",
        )
        if target == "postgres":
            env["DESTINATION__POSTGRES__CREDENTIALS"] = self.warehouse_url
        else:
            env["DESTINATION__DUCKDB__CREDENTIALS"] = str(self.work / "warehouse.duckdb")
        return env

    # -- the run ------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Start the cluster, create the databases, generate the demo source."""
        self.say(f"starting a throwaway PostgreSQL ({self.bin}) in {self.server.root}")
        self.server.start()
        admin = self.server.url()
        self.source_url = create_database(admin, "source")
        self.copy_url = create_database(admin, "copy_target")
        self.restore_url = create_database(admin, "restore_target")
        self.warehouse_url = create_database(admin, "warehouse")
        self.replica_server = ThrowawayPostgres().start()
        self.replica_url = create_database(self.replica_server.url(), "replication_warehouse")
        self.project = self.work / "project"
        (self.project / ".dlt").mkdir(parents=True)
        shutil.copy(PROJECT_ROOT / ".dlt" / "config.toml", self.project / ".dlt" / "config.toml")
        self.say(f"generating the demo source at scale {self.scale:g} …")
        started = time.monotonic()
        demo = [sys.executable, "-m", "datamart.demo", "--scale", str(self.scale), "--source-url", self.source_url]
        result = subprocess.run(
            [*demo, "--bucket", str(self.work / "bucket")], env=self.env(), cwd=PROJECT_ROOT, capture_output=True
        )
        if result.returncode != 0:
            raise RuntimeError(f"demo generation failed:\n{result.stdout.decode()}\n{result.stderr.decode()}")
        self.counts = self.source_counts()
        self.generated_in = time.monotonic() - started
        counts = ", ".join(f"{t} {n:,}" for t, n in self.counts.items())
        self.say(f"  generated in {self.generated_in:.0f}s: {counts}")

    def source_counts(self) -> dict[str, int]:
        """Rows per source table."""
        return {t: int(self.psql(self.source_url, f"SELECT count(*) FROM {t}")) for t in TABLES}

    def copy_baseline(self) -> None:
        """Schema first (not timed), then every table's rows through two psql processes and a pipe."""
        schema = subprocess.run(
            [str(self.bin / "pg_dump"), "--schema-only", *[f"--table={t}" for t in TABLES], self.source_url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        subprocess.run(
            [str(self.bin / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", self.copy_url],
            input=schema,
            capture_output=True,
            text=True,
            check=True,
        )
        psql = shlex.quote(str(self.bin / "psql"))
        pipes = [
            f"{psql} -X -q -d {shlex.quote(self.source_url)} -c '\\copy {t} to stdout' | "
            f"{psql} -X -q -v ON_ERROR_STOP=1 -d {shlex.quote(self.copy_url)} -c '\\copy {t} from stdin'"
            for t in TABLES
        ]
        script = "set -euo pipefail\n" + "\n".join(pipes)
        self.measure("copy", ["bash", "-c", script], sum(self.counts.values()))

    def dump_restore(self) -> None:
        """``pg_dump -Fc`` of the five tables piped into ``pg_restore`` (schema, data, primary keys, indexes)."""
        dump = shlex.join([str(self.bin / "pg_dump"), "-Fc", *[f"--table={t}" for t in TABLES], self.source_url])
        restore = shlex.join([str(self.bin / "pg_restore"), "--no-owner", "-d", self.restore_url])
        script = f"set -euo pipefail\n{dump} | {restore}"
        self.measure("dump_restore", ["bash", "-c", script], sum(self.counts.values()))

    def dlt_run(self, key: str, target: str, rows: int, pipeline: str = "app_db") -> Step:
        """``dlt pipeline <pipeline> run`` on a target, measured."""
        dlt = str(Path(sys.executable).parent / "dlt")
        return self.measure(key, [dlt, "pipeline", pipeline, "run"], rows, env=self.env(target))

    def quiet(self, command: list[str], target: str = "postgres") -> str:
        """Run a preparatory command (not measured); raise with its output when it fails."""
        result = subprocess.run(command, env=self.env(target), cwd=PROJECT_ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{shlex.join(command)} failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout

    def full_loads(self) -> None:
        """The first load of app_db into each warehouse, fresh state; checked against the source's counts."""
        rows = sum(self.counts.values())
        self.dlt_run("full_postgres", "postgres", rows)
        self.check_counts("postgres")
        self.dlt_run("full_duckdb", "duckdb", rows)
        self.check_counts("duckdb")

    def check_counts(self, target: str) -> None:
        """Stop when a warehouse table does not hold exactly the source's rows."""
        from datamart.ingest.declarations import load_named

        declared = load_named("app_db")
        for table in TABLES:
            # a history table (history: scd2) holds every version: its current versions are the source's rows
            current = f" WHERE {declared.table(table).current_only}"
            if target == "postgres":
                loaded = int(self.psql(self.warehouse_url, f"SELECT count(*) FROM raw_app_db.{table}{current}"))
            else:
                import duckdb

                with duckdb.connect(str(self.work / "warehouse.duckdb"), read_only=True) as conn:
                    loaded = conn.execute(f"SELECT count(*) FROM raw_app_db.{table}{current}").fetchone()[0]
            live = " WHERE deleted_at IS NULL" if table in SOFT_DELETED else ""  # soft-deleted rows are removed
            expected = int(self.psql(self.source_url, f"SELECT count(*) FROM {table}{live}"))
            if loaded != expected:
                raise RuntimeError(f"{target}: raw_app_db.{table} holds {loaded:,} rows, the source {expected:,}")

    def sqlmesh_steps_before(self) -> None:
        """The bucket pipeline (small, not measured), the first prod build, then a plan with nothing to do."""
        self.say("loading the bucket pipeline (partners, reports; not measured) …")
        self.quiet([str(Path(sys.executable).parent / "dlt"), "pipeline", "bucket", "run"])
        python = sys.executable
        self.measure("sqlmesh_first_build", [python, "-m", "datamart", "promote"], 0)
        self.measure(
            "sqlmesh_plan_no_change", [python, "-m", "datamart", "sqlmesh", "plan", "--no-prompts", "--auto-apply"], 0
        )

    def change_one_percent(self) -> int:
        """Change exactly 1 % of each table's rows in the source; return the number of rows changed.

        Merge tables: half of them updated (a new updated_at), a quarter inserted (copies under new ids), a quarter
        hard-deleted. stats_events (append-only): 1 % new events, after the last one.
        """
        changed = 0
        statements = []
        for table in MERGE_TABLES:
            n = max(4, round(self.counts[table] * CHANGED_SHARE))
            inserted = deleted = n // 4
            updated = n - inserted - deleted
            columns = self.psql(
                self.source_url,
                "SELECT string_agg(column_name, ',' ORDER BY ordinal_position) FROM information_schema.columns "
                f"WHERE table_schema = 'public' AND table_name = '{table}'",
            ).split(",")
            picked = f"bench_{table}"
            selected = ", ".join(
                "id + (SELECT max(id) FROM " + table + ")"
                if c == "id"
                else "(SELECT max(updated_at) FROM " + table + ") + interval '1 hour'"
                if c == "updated_at"
                else c
                for c in columns
            )
            statements += [
                f"CREATE TEMP TABLE {picked} AS SELECT id, row_number() OVER (ORDER BY md5(id::text)) AS n "
                f"FROM {table}",
                f"INSERT INTO {table} ({','.join(columns)}) SELECT {selected} FROM {table} "
                f"WHERE id IN (SELECT id FROM {picked} WHERE n > {updated + deleted} AND n <= {n})",
                f"UPDATE {table} SET updated_at = (SELECT max(updated_at) FROM {table}) + interval '1 hour' "
                f"WHERE id IN (SELECT id FROM {picked} WHERE n <= {updated})",
                f"DELETE FROM {table} WHERE id IN (SELECT id FROM {picked} WHERE n > {updated} "
                f"AND n <= {updated + deleted})",
            ]
            changed += n
        events = max(1, round(self.counts["stats_events"] * CHANGED_SHARE))
        statements.append(
            "INSERT INTO stats_events SELECT id + (SELECT max(id) FROM stats_events), event_type, partner_id, "
            "mission_id, (SELECT max(occurred_at) FROM stats_events) + interval '1 second' * (id % 3600) "
            f"FROM stats_events ORDER BY id LIMIT {events}"
        )
        changed += events
        self.say(f"changing 1 % of the source: {changed:,} rows (updates, inserts, deletes, new events) …")
        columns = self.psql(
            self.source_url,
            "SELECT string_agg(column_name, ',' ORDER BY ordinal_position) FROM information_schema.columns "
            "WHERE table_schema = 'public' AND table_name = 'stats_events'",
        )
        if columns != "id,event_type,partner_id,mission_id,occurred_at":
            raise RuntimeError(f"stats_events columns changed ({columns}): update change_one_percent")
        self.psql(self.source_url, "BEGIN;\n" + ";\n".join(statements) + ";\nCOMMIT;")
        return changed

    def replication_env(self) -> dict[str, str]:
        """The demo's app_db declared in replication mode (datamart/demo/pipelines/replication), into a warehouse
        database of its own, with its own dlt working directory."""
        env = self.env("postgres")
        env.update(
            DATAMART_DECLARATIONS_DIR=str(PROJECT_ROOT / "datamart" / "demo" / "pipelines" / "replication"),
            DATAMART_PIPELINES_DIR=str(self.work / "pipelines_replication"),
            DESTINATION__POSTGRES__CREDENTIALS=self.replica_url,
        )
        return env

    def replication_run(self, key: str, rows: int) -> None:
        """``dlt pipeline app_db run`` in replication mode, measured, then checked: every source table's rows are in
        the warehouse (replication keeps soft-deleted rows with their deleted_at, as the source does)."""
        dlt = str(Path(sys.executable).parent / "dlt")
        self.measure(key, [dlt, "pipeline", "app_db", "run"], rows, env=self.replication_env())
        for table in TABLES:
            source = self.counts_now(table)
            current = " WHERE _dlt_valid_to IS NULL" if table == "missions" else ""  # history: scd2, every version
            loaded = int(self.psql(self.replica_url, f"SELECT count(*) FROM raw_app_db.{table}{current}"))
            if loaded != source:
                raise RuntimeError(f"replication mode: raw_app_db.{table} holds {loaded:,} rows, the source {source:,}")

    def incremental(self) -> None:
        """1 % changed → incremental run (checked), promotion, then a run with no change; the same change read by
        a replication-mode pipeline whose first run (slot + copy) was taken before it."""
        self.replication_run("replication_copy", sum(self.counts.values()))
        changed = self.change_one_percent()
        # first the replication run: its slot then reads the change's WAL only, not the cursor load's writes into
        # the warehouse database of the source's cluster (a source server does not host the warehouse)
        self.replication_run("replication_after_change", changed)
        self.dlt_run("incremental_postgres", "postgres", changed)
        self.check_counts("postgres")
        self.measure("sqlmesh_after_incremental", [sys.executable, "-m", "datamart", "promote"], 0)
        self.dlt_run("no_change_postgres", "postgres", 0)

    def key_set_deletes(self) -> None:
        """The runner's key-set comparison over stats_events (the biggest table) against the PostgreSQL warehouse.

        Its own process: the wall time includes Python's start and imports; the comparison alone, as a run does it
        in its already started process, is printed as a ``profile:`` line (``detection``) and used for the target.
        """
        events = self.counts_now("stats_events")
        code = (
            "import time; started = time.monotonic(); from datamart.ingest.declarations import load_named; "
            "from datamart.ingest.deletes import gone_keys; from datamart.settings import resolve_warehouse; "
            "from datamart.ingest.sources import source_credentials; import dataclasses; "
            "decl = load_named('app_db'); table = dataclasses.replace(decl.table('stats_events'), "
            "deletes={'hard': 'key_set'}); url = source_credentials(decl); warehouse = resolve_warehouse(); "
            "detecting = time.monotonic(); "
            f"gone = gone_keys(decl, table, url, warehouse, rows={events}); "
            "done = time.monotonic(); print('gone', gone.num_rows); "
            "print(f'key-set profile: start {detecting - started:.2f}s, detection {done - detecting:.2f}s')"
        )
        self.measure("key_set_deletes", [sys.executable, "-c", code], 2 * events)

    def counts_now(self, table: str) -> int:
        """Rows of a source table now."""
        return int(self.psql(self.source_url, f"SELECT count(*) FROM {table}"))

    def file_loads(self) -> None:
        """A CSV and a Parquet file of about 200 MB (scale 500) loaded into a fresh DuckDB file, each table checked
        against the file's rows."""
        import duckdb

        rows = max(1000, round(FILE_ROWS_AT_500 * self.scale / 500))
        bucket = self.work / "file_bucket"
        declarations = self.work / "file_declarations"
        for folder in (bucket / "csv", bucket / "parquet", declarations):
            folder.mkdir(parents=True)
        (declarations / "bench_files.yaml").write_text(FILES_DECLARATION)
        self.say(f"writing the benchmark files ({rows:,} rows each) …")
        with duckdb.connect() as conn:
            csv_path, parquet_path = bucket / "csv" / "rows.csv", bucket / "parquet" / "rows.parquet"
            conn.execute(f"COPY ({FILE_ROWS_SQL.format(rows=rows, extra='')}) TO '{csv_path}' (HEADER)")
            token = ", md5(i::VARCHAR) AS token"
            conn.execute(
                f"COPY ({FILE_ROWS_SQL.format(rows=rows, extra=token)}) TO '{parquet_path}' "
                "(FORMAT parquet, COMPRESSION uncompressed)"
            )
        self.file_sizes = {"csv": csv_path.stat().st_size, "parquet": parquet_path.stat().st_size}
        dlt = str(Path(sys.executable).parent / "dlt")
        env = self.env("duckdb")
        env.update(
            DATAMART_DECLARATIONS_DIR=str(declarations),
            SOURCES__BENCH_FILES__BUCKET_URL=str(bucket),
            DESTINATION__DUCKDB__CREDENTIALS=str(self.work / "files.duckdb"),
        )
        for key, table in (("file_csv_duckdb", "csv_rows"), ("file_parquet_duckdb", "parquet_rows")):
            step = self.measure(key, [dlt, "pipeline", "bench_files", "run", "--table", table], rows, env=env)
            size = self.file_sizes["csv" if table == "csv_rows" else "parquet"]
            step.note = f"{size / 1e6:.0f} MB file"
            with duckdb.connect(str(self.work / "files.duckdb"), read_only=True) as conn:
                loaded = conn.execute(f"SELECT count(DISTINCT id) FROM raw_bench_files.{table}").fetchone()[0]
            if loaded != rows:
                raise RuntimeError(f"raw_bench_files.{table} holds {loaded:,} rows, the file {rows:,}")

    def run(self) -> dict[str, Any]:
        """Every step; the report as a dict."""
        self.setup()
        self.copy_baseline()
        self.dump_restore()
        self.full_loads()
        self.sqlmesh_steps_before()
        self.incremental()
        self.key_set_deletes()
        self.file_loads()
        return self.report()

    def report(self) -> dict[str, Any]:
        """Ratios, targets and the machine, with every step."""
        copy = self.steps["copy"]
        for step in self.steps.values():
            if step.rows_per_s and copy.rows_per_s:
                step.ratio_to_copy = step.rows_per_s / copy.rows_per_s
        full = self.steps["full_postgres"]
        incremental = self.steps["incremental_postgres"]
        no_change = self.steps["no_change_postgres"]
        loads = (
            "full_postgres",
            "incremental_postgres",
            "no_change_postgres",
            "replication_copy",
            "replication_after_change",
        )
        rss = max(self.steps[k].peak_rss_mb for k in loads)
        targets = [
            target("full load → PostgreSQL ≥ 0.5× COPY rows/s", full.ratio_to_copy or 0, ">=", 0.5, "×"),
            target("incremental ≤ 5 % of the full load's wall time", incremental.seconds / full.seconds, "<=", 0.05),
            target("no-change run ≤ 2 s per table", no_change.seconds / len(TABLES), "<=", 2.0, " s"),
            target("peak RSS of a load into PostgreSQL ≤ 1 GiB", rss / 1024, "<=", 1.0, " GiB"),
            target(
                "peak RSS of the load into DuckDB ≤ 1 GiB",
                self.steps["full_duckdb"].peak_rss_mb / 1024,
                "<=",
                1.0,
                " GiB",
            ),
            *datamart_targets(self.steps),
            target(
                "key-set delete detection within the incremental target",
                self.steps["key_set_deletes"].profile.get("detection", self.steps["key_set_deletes"].seconds)
                / full.seconds,
                "<=",
                0.05,
            ),
            target(
                "replication mode: run after 1 % changed ≤ 5 % of the full load's wall time",
                self.steps["replication_after_change"].seconds / full.seconds,
                "<=",
                0.05,
            ),
            target(
                "peak RSS of a file load (CSV, Parquet) ≤ 1 GiB",
                max(self.steps[k].peak_rss_mb for k in ("file_csv_duckdb", "file_parquet_duckdb")) / 1024,
                "<=",
                1.0,
                " GiB",
            ),
        ]
        return {
            "scale": self.scale,
            "source_rows": self.counts,
            "generated_in_s": round(self.generated_in, 1),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine(),
            "steps": [asdict(self.steps[key]) for key, _ in STEPS if key in self.steps],
            "targets": targets,
        }


#: A step is reported when it runs past LATE times its last figure, and stopped past GIVE_UP times (make bench);
#: never before the floors (seconds): start-up costs make small steps' figures noisy.
LATE, LATE_FLOOR = 3, 60.0
GIVE_UP, GIVE_UP_FLOOR = 10, 300.0


def expected_seconds(key: str, scale: float) -> float | None:
    """The step's seconds in the last committed run (bench/results/latest.json), scaled linearly to ``scale``."""
    try:
        last = json.loads((RESULTS_DIR / "latest.json").read_text())
    except (OSError, ValueError):
        return None
    steps = last.get("steps", [])
    step = next((s for s in (steps.values() if isinstance(steps, dict) else steps) if s.get("key") == key), None)
    if step is None or not last.get("scale"):
        return None
    return float(step["seconds"]) * max(scale / float(last["scale"]), 0.01)


def datamart_targets(steps: dict[str, Step]) -> list[dict[str, Any]]:
    """The datamart after 1 % changed, alone (the promotion's refresh / the first prod build) and end to end (the
    incremental load + that promotion / the full load + the first prod build): what a 1 % change costs the night."""
    first, after = steps["sqlmesh_first_build"], steps["sqlmesh_after_incremental"]
    full_end_to_end = steps["full_postgres"].seconds + first.seconds
    end_to_end = steps["incremental_postgres"].seconds + after.seconds
    return [
        target("datamart after 1 % changed ≤ 10 % of the first prod build", after.seconds / first.seconds, "<=", 0.1),
        target(
            "end to end (load + datamart) after 1 % changed ≤ 10 % of a full end-to-end refresh",
            end_to_end / full_end_to_end,
            "<=",
            0.1,
        ),
    ]


def target(name: str, value: float, op: str, limit: float, unit: str = "") -> dict[str, Any]:
    """One target with its measured value."""
    met = value >= limit if op == ">=" else value <= limit
    shown = f"{value:.1%}" if not unit else f"{value:.2f}{unit}"
    return {"target": name, "measured": shown, "value": value, "met": met}


def parse_profile(log: str) -> dict[str, float]:
    """The ``profile:`` line a datamart run prints (extract, normalize, load… seconds), summed over pipelines."""
    profile: dict[str, float] = {}
    for line in log.splitlines():
        if "profile:" not in line:
            continue
        for name, seconds in re.findall(r"([a-z][a-z -]*?) ([\d.]+)s", line.split("profile:", 1)[1]):
            profile[name.strip()] = profile.get(name.strip(), 0.0) + float(seconds)
    return profile


def machine() -> str:
    """CPU model, cores, memory, OS, PostgreSQL and Python versions, and the load average when the run ended."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kb / 1024**2:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    load = ", load average {:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg())
    return f"{cpu}, {os.cpu_count()} cores{memory}, {platform.system()} {platform.release()}, Python " + (
        f"{platform.python_version()}{load}"
    )


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table, then the targets."""
    rows = report["source_rows"]
    lines = [
        f"Scale {report['scale']:g}: " + ", ".join(f"{t} {n:,}" for t, n in rows.items()) + f" ({sum(rows.values()):,}"
        " rows).",
        f"Machine: {report['machine']}. Finished {report['finished_at']}.",
        "",
        "| step | wall time | client CPU | rows | rows/s | × COPY rows/s | peak RSS | where the time goes |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for step in report["steps"]:
        ratio = f"{step['ratio_to_copy']:.2f}" if step["ratio_to_copy"] else "—"
        rate = f"{step['rows_per_s']:,.0f}" if step["rows_per_s"] else "—"
        profile = ", ".join(f"{k} {v:.1f}s" for k, v in step["profile"].items())
        profile = "; ".join(p for p in (step["note"], profile) if p)  # e.g. the size of a benchmark file
        label = step["label"].replace("|", "\\|")  # a pipe inside a Markdown cell
        lines.append(
            f"| {label} | {step['seconds']:.1f} s | {step['cpu_seconds']:.1f} s | {step['rows']:,} | {rate} | "
            f"{ratio} | {step['peak_rss_mb']:.0f} MB | {profile} |"
        )
    lines += ["", "| target | measured | met |", "|---|---:|---|"]
    for item in report["targets"]:
        lines.append(f"| {item['target']} | {item['measured']} | {'yes' if item['met'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the benchmark, write the report; always remove the cluster."""
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scale", type=float, default=500, help="demo scale (500 ≈ 1 M volunteers, 10 M events; default)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS_DIR / "latest",
        help="path without extension: writes <output>.md and <output>.json (default bench/results/latest)",
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    work = Path(tempfile.mkdtemp(prefix="datamart-bench-"))
    os.chmod(work, 0o755)
    bench = Bench(args.scale, work)
    try:
        report = bench.run()
    except KeyboardInterrupt:
        bench.say("interrupted: stopping the cluster and removing the temporary files")
        return 130
    finally:
        try:
            bench.server.stop()
            if bench.replica_server is not None:
                bench.replica_server.stop()
        finally:
            shutil.rmtree(work, ignore_errors=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    table = markdown(report)
    args.output.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(table)
    print("\n" + table)
    print(f"written: {args.output.with_suffix('.md')} and {args.output.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
