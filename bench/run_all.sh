#!/usr/bin/env bash
# Every full benchmark, one after the other (the order matters: detection_vs_cleanlab reuses
# label_noise's runs). About 30 minutes on a quiet 2-CPU machine. Logs: bench/results/logs/.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results/logs
py=.venv/bin/python
run() { echo "== $* ($(date -u +%H:%M:%S))"; "$py" "$@" > "bench/results/logs/$(basename "$1" .py).log" 2>&1 || echo "FAILED: $*"; }
run bench/scale.py
run bench/label_noise.py
run bench/paper_table1.py
run bench/detection_vs_cleanlab.py
run bench/attribution_cost.py
run bench/ray_vs_local.py
echo "== done ($(date -u +%H:%M:%S))"
