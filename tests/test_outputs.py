"""A finished local digits run, as a user meets it: the console of the real CLI, config.yaml, the label issues
table and the repaired model read back with the usual tools (pandas, torch)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# The digits defaults with fewer epochs: the per-epoch lines are about five per route whatever the epochs.
OVERRIDES = ["initial.epochs=5", "l_ft.epochs=2", "f_ft.epochs=2", "retrain.epochs=2", "run.device=cpu"]


def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "raypipe.cli", *argv], capture_output=True, text=True, env=env, cwd=REPO, timeout=600
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs") / "run"
    done = _cli("run", "--out", str(out), *OVERRIDES)
    assert done.returncode == 0, done.stderr[-2000:]
    return out, done


def test_the_console_is_short_and_says_what_matters(finished):
    out, done = finished
    lines = (done.stdout + done.stderr).splitlines()
    assert len(lines) < 60, "\n".join(lines)
    assert done.stderr == ""  # no warnings, no progress bars off a terminal
    assert f"{out}/config.yaml" in lines[0]  # the whole config is there, not on the console
    assert not any(line.startswith(("initial:", "sweep:", "ray:")) for line in lines)
    for route in ("initial", "l_ft", "f_ft", "retrain"):
        assert any(line.startswith(f"[{route}] epoch ") for line in lines), route
    assert any(line.startswith("  F-FT     accuracy") for line in lines)
    assert lines[1] == "  data       digits, symmetric noise 0.4 injected"  # the benchmark keeps its noise
    assert "symmetric noise 0.4 injected" in (out / "report.md").read_text()


def test_config_yaml_is_what_raypipe_config_prints(finished):
    out, _ = finished
    printed = _cli("config", *OVERRIDES)
    assert printed.returncode == 0
    assert yaml.safe_load(printed.stdout) == yaml.safe_load((out / "config.yaml").read_text())


def test_the_repaired_model_loads_and_scores_what_the_report_says(finished):
    import json

    import torch

    import raypipe
    from raypipe.layout import RunLayout
    from raypipe.stages.data import read_split

    out, _ = finished
    report = json.loads((out / "report.json").read_text())
    model = raypipe.load_model(str(out))
    assert not model.training and int((model.probe_mask == 0).sum()) == report["pruning"]["n_pruned"]
    test = read_split(RunLayout(str(out)).stage("data"), "test")
    with torch.no_grad():
        predicted = model(torch.from_numpy(np.array(test.x))).argmax(1).numpy()
    assert (predicted == test.label).mean() == pytest.approx(report["routes"]["f_ft"]["accuracy"], abs=1e-6)
    assert "clean labels of the digits test split" in report["accuracy_measured_against"]


def test_label_issues_read_with_pandas_hold_every_training_row(finished):
    import pandas as pd

    from raypipe import layout
    from raypipe.layout import RunLayout

    out, _ = finished
    issues = pd.read_parquet(layout.label_issues_file(RunLayout(str(out)).stage("partition")))
    assert len(issues) == 1258 and issues["sample_id"].is_unique
    for column in ("is_label_issue", "label_score", "given_label", "predicted_label", "suggested_label", "p_noisy"):
        assert column in issues.columns
    flagged = issues[issues["is_label_issue"]]
    assert (flagged["suggested_label"] != flagged["given_label"]).all()
    assert issues["label_score"].is_unique and issues["label_score"].between(0, 1).all()
    assert list(issues.index[: len(flagged)]) == list(flagged.index)  # flagged rows first


def test_find_label_issues_runs_the_detection_stages_only_and_reuses_a_run(finished, tmp_path):
    import shutil

    import pandas as pd

    import raypipe
    from raypipe.config import load_config

    out, _ = finished
    again = tmp_path / "again"
    shutil.copytree(out, again)
    logs: list[str] = []
    issues = raypipe.find_label_issues(load_config(None, OVERRIDES), str(again), log=logs.append)
    for stage in ("data", "initial", "attribution", "partition"):
        assert f"[{stage}] up to date, skipped" in logs, logs
    assert not any(line.startswith(("[prune]", "[f_ft]", "[report]")) for line in logs)
    pd.testing.assert_frame_equal(issues, pd.read_parquet(again / "partition" / "issues"))


def test_find_issues_cli_with_a_given_model(finished, tmp_path):
    out, _ = finished
    fresh = tmp_path / "given"
    done = _cli("find-issues", "--out", str(fresh), "--model", str(out / "initial" / "model.pt"), *OVERRIDES)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "training samples flagged; every row: " in done.stdout
    assert sorted(p.name for p in fresh.iterdir() if p.is_dir()) == ["attribution", "data", "initial", "partition"]
    assert not (fresh / "report.json").exists()
    assert "model.checkpoint" in done.stdout.splitlines()[3]  # the summary says the model is given


def test_every_folder_reads_whole_with_pandas(finished, data_set_folders):
    """Every folder of Parquet files in the run is one data set: pandas reads each whole, one row per sample."""
    import pandas as pd

    out, _ = finished
    folders = data_set_folders(out)
    assert set(folders) == {
        "data/train",
        "data/val",
        "data/test",
        "initial/trajectory",
        "attribution/samples",
        "attribution/features",  # L-FT is among the default routes
        "partition/split",
        "partition/signals",
        "partition/issues",
        "attribution/val",  # the validation split's own detection, to recommend a route without the test split
        "partition/val",
        "partition/val_cleaned",
    }
    assert folders["data/test"] == 359 and folders["data/val"] == 180 and folders["partition/issues"] == 1258
    assert folders["attribution/val"] == folders["partition/val"] == 180 and 0 < folders["partition/val_cleaned"] < 180
    train_ids = np.sort(pd.read_parquet(out / "data" / "train")["sample_id"].to_numpy())
    for folder, n_rows in folders.items():
        frame = pd.read_parquet(out / folder)
        assert len(frame) == n_rows and frame["sample_id"].is_unique, folder
        if n_rows == len(train_ids):
            np.testing.assert_array_equal(np.sort(frame["sample_id"].to_numpy()), train_ids, err_msg=folder)
    assert np.asarray(pd.read_parquet(out / "data" / "train")["x"].iloc[0]).size == 64  # one array per row
    assert np.asarray(pd.read_parquet(out / "attribution" / "samples")["probe"].iloc[0]).shape == (256,)
