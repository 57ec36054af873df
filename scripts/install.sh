#!/usr/bin/env bash
# Installs resnet_fast (editable, building its C++/CUDA extension) with the test extras.
# Without torch this installs the CPU build 2.13.0 (an unpinned torch would pull GBs of CUDA packages);
# an installed torch is kept as it is, so on a GPU machine the CUDA extension is built against it.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q torch==2.13.0
python3 -m pip install -q --no-build-isolation -e ".[test]"
