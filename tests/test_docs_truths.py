"""What the README and the other docs state about the repository is true: files named exist, numbers match the code,
exit codes are the ones the commands give."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

from datamart.ingest.deletes import MAX_BUCKETS, MIN_BUCKET_WIDTH
from datamart.settings import PROJECT_ROOT
from datamart.testing.commands import environment

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


# the README is the front door; the manual lives in these
MANUAL = (
    "docs/pipelines.md",
    "docs/review-and-promotion.md",
    "docs/privacy.md",
    "docs/operations.md",
    "docs/known-limits.md",
    "docs/demo-source.md",
    "models/README.md",
    "bench/README.md",
)
DOCS = ("README.md", *MANUAL)


def _docs_text() -> str:
    """Every document, whitespace collapsed (a sentence may be wrapped anywhere)."""
    return " ".join(" ".join((PROJECT_ROOT / d).read_text(encoding="utf-8").split()) for d in DOCS)


def test_the_readme_is_a_front_door_that_links_to_the_whole_manual() -> None:
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) < 200
    assert [d for d in MANUAL if f"]({d})" not in readme] == []


def test_every_link_and_make_target_the_docs_give_exists() -> None:
    """Relative markdown links point at files that exist (anchors at headings that exist), and every `make <target>`
    shown is a target of the Makefile."""
    targets = set(re.findall(r"^([a-z][a-z-]*):", (PROJECT_ROOT / "Makefile").read_text(encoding="utf-8"), re.M))
    broken = []
    for doc in DOCS:
        path = PROJECT_ROOT / doc
        text = path.read_text(encoding="utf-8")
        for link in re.findall(r"\]\(([^)\s]+)\)", text):
            if link.startswith(("http://", "https://", "mailto:")):
                continue
            file, _, anchor = link.partition("#")
            target = (path.parent / file).resolve() if file else path
            if not target.exists():
                broken.append(f"{doc}: link {link}")
            elif anchor and target.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", target.read_text(encoding="utf-8"), re.M)
                slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
                if anchor not in slugs:
                    broken.append(f"{doc}: anchor {link}")
        for target in re.findall(r"`make ([a-z][a-z-]*)", text):
            if target not in targets:
                broken.append(f"{doc}: make {target}")
    assert broken == []


def test_every_file_the_docs_name_exists() -> None:
    missing = []
    for doc in (*DOCS, "dags/requirements-airflow.txt", "Makefile", "pyproject.toml"):
        for path in sorted(set(_PATH.findall((PROJECT_ROOT / doc).read_text(encoding="utf-8")))):
            if path not in _NOT_COMMITTED and not (PROJECT_ROOT / path).exists():
                missing.append(f"{doc} names {path}")
    assert missing == []


def test_the_declared_license_has_its_text() -> None:
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == "MIT"
    assert (PROJECT_ROOT / "LICENSE").read_text(encoding="utf-8").startswith("MIT License\n")


def test_the_bucket_size_the_readme_gives_is_the_code_s() -> None:
    readme = _docs_text()
    assert "buckets of 4,096 values" not in readme
    assert f"{MIN_BUCKET_WIDTH} values per bucket" in readme
    assert f"at most {MAX_BUCKETS:,} buckets" in readme


def test_make_review_exit_codes_are_the_ones_the_readme_gives() -> None:
    """A review that fails (here: the warehouse cannot be reached) exits 1; make reports it as 2."""
    env = environment(
        ("DESTINATION__", "DATAMART_", "MAKE", "MFLAGS"),
        DATAMART_TARGET="postgres",
        DESTINATION__POSTGRES__CREDENTIALS="postgresql://u:pw@127.0.0.1:9/none",
    )
    command = subprocess.run(
        [sys.executable, "-m", "datamart", "review"], env=env, cwd=PROJECT_ROOT, capture_output=True, timeout=300
    )
    make = subprocess.run(
        ["make", "--no-print-directory", "review"], env=env, cwd=PROJECT_ROOT, capture_output=True, timeout=300
    )
    assert (command.returncode, make.returncode) == (1, 2)
    readme = _docs_text()
    assert "`python -m datamart review` exits 1 when the change is refused" in readme
    assert "`make review` then exits 2" in readme
    assert "`make review` refuses it, exit code 1" not in readme
