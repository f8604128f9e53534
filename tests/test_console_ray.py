"""The console of a small sweep on digits through the real CLI, in a pipe as a log collector gets it: short, no
progress bar redraws, no Ray Train report lines. (A run's console on Ray is in test_outputs_ray.py, the local
one in test_outputs.py, bars on a terminal in test_console.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
# Four trials (2 rules x 2 learning rates), two at a time on the module's 2-CPU cluster, 3 epochs each.
SWEEP = [
    "data.max_train_samples=600",
    "initial.epochs=15",
    "run.executor=local",
    "sweep.rules=[loss,grad_x_act_label]",
    "sweep.tau=[0.5]",
    "sweep.prune_fraction=[0.156]",
    "sweep.routes=[f_ft]",
    "sweep.lr=[0.001,0.01]",
    "sweep.epochs=[3]",
    "sweep.num_samples=0",
    "sweep.cpus_per_trial=1",
]
# What a 4-trial sweep may print: the summary (~8), the shared stages (~20 with two rules), a few lines a trial,
# the best trial and the outputs (~10). Measured: 53 lines (196 with Tune's own tables, now off); see README "Sweeps".
MAX_LINES = 80


def test_a_small_sweep_console_is_short_and_has_no_redraws(ray_cluster, tmp_path):
    out = tmp_path / "sweep"
    argv = ["sweep", "--out", str(out), "--config", "jobs/configs/digits_sweep.yaml", *SWEEP]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "raypipe.cli", *argv, f"ray.address={ray_cluster}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=900,
    )
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-3000:]
    lines = console.splitlines()
    assert len(lines) <= MAX_LINES, f"{len(lines)} lines:\n{console}"
    assert "\r" not in console  # no progress bar (Ray Data's, Tune's, tqdm's) redrawn into the pipe
    assert "Reporting training result" not in console
    assert (out / "best" / "model.pt").exists()
