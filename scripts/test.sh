#!/usr/bin/env bash
# Installs resnet_fast with its test dependencies and runs the test suite (the README's test command).
# On a machine without torch this installs the CPU build 2.13.0; an installed torch is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q torch==2.13.0
python3 -m pip install -q --no-build-isolation -e ".[test]"
python3 -m pytest -q "$@"
