#!/usr/bin/env bash
# The README's test command (and CI's, through .ci/run): install, lint, then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 -m ruff check .
# One worker per core (CI has 2), at most 4 (memory, and a container may report the host's cores): the
# interpreter tests are single-threaded Python. By file, so each file's module fixtures (the sm_90 compile
# check, the cost report, the nvcc build) run once.
python3 -m pytest -q -n auto --maxprocesses 4 --dist loadfile "$@"
