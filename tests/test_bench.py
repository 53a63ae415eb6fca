"""`make bench` end to end at a tiny scale: every step runs, the table and the JSON hold every row, nothing is left.

No timing is asserted: timings at this scale measure start-up costs, and the machine is shared.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datamart.settings import PROJECT_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def _bench_module() -> object:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_run", PROJECT_ROOT / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_at_a_tiny_scale_writes_every_row_and_removes_its_cluster(tmp_path: Path) -> None:
    output = tmp_path / "results" / "tiny"
    result = subprocess.run(
        [sys.executable, "bench/run.py", "--scale", "0.05", "--output", str(output)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    steps = _bench_module().STEPS

    report = json.loads(output.with_suffix(".json").read_text())
    assert [s["key"] for s in report["steps"]] == [key for key, _ in steps]
    by_key = {s["key"]: s for s in report["steps"]}
    source_rows = sum(report["source_rows"].values())
    assert report["source_rows"]["stats_events"] > 0
    for key in ("copy", "dump_restore", "full_postgres", "full_duckdb", "replication_copy"):
        assert by_key[key]["rows"] == source_rows, key
        assert by_key[key]["seconds"] > 0 and by_key[key]["peak_rss_mb"] > 0, key
    assert by_key["copy"]["ratio_to_copy"] == pytest.approx(1.0)
    # 1 % of each table changed: at least the minimum of each kind, far fewer than the source holds
    assert 0 < by_key["incremental_postgres"]["rows"] < source_rows / 10
    # the replication-mode run reads the same change (checked against the source's counts by the bench itself)
    assert by_key["replication_after_change"]["rows"] == by_key["incremental_postgres"]["rows"]
    for key in ("full_postgres", "incremental_postgres", "no_change_postgres"):
        assert {"extract", "normalize", "load"} <= set(by_key[key]["profile"]), key
    for key in ("file_csv_duckdb", "file_parquet_duckdb"):  # the files' rows, each checked in the warehouse
        assert by_key[key]["rows"] >= 1000 and by_key[key]["peak_rss_mb"] > 0, key
        assert re.fullmatch(r"\d+ MB file", by_key[key]["note"]), by_key[key]["note"]
    assert len(report["targets"]) == 10 and all(isinstance(t["met"], bool) for t in report["targets"])
    # the datamart's cost after 1 % changed: alone, and end to end with its load
    targets = {t["target"]: t["value"] for t in report["targets"]}
    alone = next(v for k, v in targets.items() if k.startswith("datamart after 1 % changed"))
    end_to_end = next(v for k, v in targets.items() if k.startswith("end to end (load + datamart)"))
    first, after = by_key["sqlmesh_first_build"]["seconds"], by_key["sqlmesh_after_incremental"]["seconds"]
    assert alone == pytest.approx(after / first)
    full = by_key["full_postgres"]["seconds"] + first
    assert end_to_end == pytest.approx((by_key["incremental_postgres"]["seconds"] + after) / full)
    replication = next(v for k, v in targets.items() if k.startswith("replication mode: run after 1 % changed"))
    assert replication == pytest.approx(
        by_key["replication_after_change"]["seconds"] / by_key["full_postgres"]["seconds"]
    )

    table = output.with_suffix(".md").read_text()
    assert table in result.stdout, "the table printed is the one written"
    for _, label in steps:
        assert label.replace("|", "\\|") in table, label
    for item in report["targets"]:
        assert item["target"] in table

    # progress lines while it ran, then the cluster and its directory are gone
    assert re.search(r"^\[\d\d:\d\d:\d\d\] full load → PostgreSQL", result.stdout, re.MULTILINE)
    cluster = re.search(r"starting a throwaway PostgreSQL \(.*\) in (\S+)", result.stdout).group(1)
    assert not Path(cluster).exists()


def test_a_step_far_past_its_last_figure_is_reported_then_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bench never waits for ever: a step running far past its last figure (scaled to the run's size) is
    reported with what the server runs, then stopped with its whole process tree, and the bench fails naming it."""
    bench = _bench_module()
    monkeypatch.setattr(bench, "LATE_FLOOR", 0.5)
    monkeypatch.setattr(bench, "GIVE_UP_FLOOR", 2.0)
    monkeypatch.setattr(bench, "expected_seconds", lambda key, scale: 0.2)
    out = io.StringIO()
    run = bench.Bench(scale=1, work=tmp_path, out=out)
    monkeypatch.setattr(run, "running_statements", lambda: "warehouse: 3s CREATE TABLE marts…")
    child = tmp_path / "child.pid"
    # a step whose own child would outlive it if only the step were killed
    command = [
        sys.executable,
        "-c",
        f"import subprocess, time; p = subprocess.Popen(['sleep', '600']); "
        f"open({str(child)!r}, 'w').write(str(p.pid)); time.sleep(600)",
    ]
    with pytest.raises(RuntimeError, match=r"stopped after \d+s, 10× its last figure"):
        run.measure("sqlmesh_first_build", command, rows=0, env=dict(os.environ))
    assert "more than 3× its last figure" in out.getvalue()
    assert "CREATE TABLE marts" in out.getvalue()
    pid = int(child.read_text())
    for _ in range(50):
        if not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the step's child {pid} outlived it")
