#!/usr/bin/env bash
# The README's test command (and CI's, through .ci/run): install, lint, then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 -m ruff check .
python3 -m pytest -q "$@"
