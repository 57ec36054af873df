#!/usr/bin/env bash
# The README's main command: install, then run the benchmark. With a GPU it writes the full report;
# without one it runs a small CPU demo (Triton interpreter) and says that its timings are not GPU timings.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 -m resnet_fast.bench "$@"
