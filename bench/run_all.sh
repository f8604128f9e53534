#!/usr/bin/env bash
# Every full benchmark, one after the other (the order matters: detection_vs_cleanlab reuses
# label_noise's runs, prune_activation reads matched_budget's). Hours on a quiet 2-CPU machine (the
# 20k-sample ones: ray_vs_local about 55 min, class_noise and detection_ceiling about an hour each,
# matched_budget about 27 min per noise and seed at 30 Initial epochs). Logs: bench/results/logs/.
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
run bench/lft_cost.py
run bench/class_noise.py
run bench/detection_ceiling.py
run bench/matched_budget.py --initial-epochs 30 --ft-epochs 5
run bench/prune_activation.py --initial-epochs 30 --ft-epochs 5
echo "== done ($(date -u +%H:%M:%S))"
