"""What the README and the other docs state about the repository is true: files named exist, numbers match the code,
exit codes are the ones the commands give."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib

from datamart.ingest.deletes import MAX_BUCKETS, MIN_BUCKET_WIDTH
from datamart.settings import PROJECT_ROOT

# repository paths as the docs write them (`dags/datamart_dag.py`, `.github/workflows/ci.yml`, `LICENSE`…)
_PATH = re.compile(
    r"(?<![\w/.<-])((?:\.github|\.ci|\.dlt|dags|deploy|docs|scripts|bench|tests|datamart|models|pipelines|macros"
    r"|audits)/[\w./-]*\w|\.gitlab-ci\.yml|LICENSE)"
)
# named by the docs but not committed, on purpose
_NOT_COMMITTED = {
    ".dlt/secrets.toml": "git-ignored, written by make run or by hand",
    "bench/results/latest": "the prefix of make bench's output files",
    "models/marts/missions_v2.sql": "the walkthrough creates it",
    "tests/test_": "the start of the pattern tests/test_*.yaml",
}


def test_every_file_the_docs_name_exists() -> None:
    missing = []
    for doc in ("README.md", "dags/requirements-airflow.txt", "Makefile", "pyproject.toml"):
        for path in sorted(set(_PATH.findall((PROJECT_ROOT / doc).read_text(encoding="utf-8")))):
            if path not in _NOT_COMMITTED and not (PROJECT_ROOT / path).exists():
                missing.append(f"{doc} names {path}")
    assert missing == []


def test_the_declared_license_has_its_text() -> None:
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == "MIT"
    assert (PROJECT_ROOT / "LICENSE").read_text(encoding="utf-8").startswith("MIT License\n")


def test_the_bucket_size_the_readme_gives_is_the_code_s() -> None:
    readme = " ".join((PROJECT_ROOT / "README.md").read_text(encoding="utf-8").split())
    assert "buckets of 4,096 values" not in readme
    assert f"{MIN_BUCKET_WIDTH} values per bucket" in readme
    assert f"at most {MAX_BUCKETS:,} buckets" in readme


def test_make_review_exit_codes_are_the_ones_the_readme_gives() -> None:
    """A review that fails (here: the warehouse cannot be reached) exits 1; make reports it as 2."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DESTINATION__", "DATAMART_", "MAKE", "MFLAGS"))}
    env.update(DATAMART_TARGET="postgres", DESTINATION__POSTGRES__CREDENTIALS="postgresql://u:pw@127.0.0.1:9/none")
    command = subprocess.run(
        [sys.executable, "-m", "datamart", "review"], env=env, cwd=PROJECT_ROOT, capture_output=True, timeout=300
    )
    make = subprocess.run(
        ["make", "--no-print-directory", "review"], env=env, cwd=PROJECT_ROOT, capture_output=True, timeout=300
    )
    assert (command.returncode, make.returncode) == (1, 2)
    readme = " ".join((PROJECT_ROOT / "README.md").read_text(encoding="utf-8").split())
    assert "`python -m datamart review` exits 1 when the change is refused" in readme
    assert "`make review` then exits 2" in readme
    assert "`make review` refuses it, exit code 1" not in readme
