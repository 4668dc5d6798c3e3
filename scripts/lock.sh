#!/usr/bin/env bash
# Write requirements.lock (runtime: the Docker image) and requirements-dev.lock (runtime + dev: the venv of
# `make install`) from pyproject.toml, every transitive dependency pinned with its hashes, with uv's resolver.
# The versions already locked are kept (passed as constraints) unless pyproject.toml asks for others; delete a
# line of requirements-dev.lock to let that package move.
set -euo pipefail
cd "$(dirname "$0")/.."
tools="$(mktemp -d)"
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools/venv"
"$tools/venv/bin/pip" install -q --disable-pip-version-check uv==0.9.5
uv="$tools/venv/bin/uv"
keep=()
if [[ -f requirements-dev.lock ]]; then
  grep -E '^[A-Za-z0-9_.-]+==' requirements-dev.lock | sed 's/ .*//' > "$tools/keep.txt"
  keep=(-c "$tools/keep.txt")
fi
common=(--python-version 3.11 --python-platform x86_64-unknown-linux-gnu --generate-hashes --no-annotate --no-header -q)
"$uv" pip compile pyproject.toml "${common[@]}" "${keep[@]}" -o requirements.lock
"$uv" pip compile pyproject.toml --extra dev "${common[@]}" "${keep[@]}" -o requirements-dev.lock
echo "wrote requirements.lock ($(grep -c '==' requirements.lock) packages) and requirements-dev.lock ($(grep -c '==' requirements-dev.lock))"
