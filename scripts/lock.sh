#!/usr/bin/env bash
# Regenerate constraints.txt: install pyproject.toml's dependencies (and the dev tools) in a fresh venv, then freeze
# every version. `make install`, CI (through make install) and deploy/Dockerfile install with `-c constraints.txt`.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
venv=.cache/lock-venv
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -e ".[dev]"
{ sed -n '1,2p' constraints.txt; "$venv/bin/python" -m pip freeze --exclude-editable; } > constraints.txt.new
mv constraints.txt.new constraints.txt
rm -rf "$venv"
echo "constraints.txt regenerated: review the diff, run make install, commit it"
