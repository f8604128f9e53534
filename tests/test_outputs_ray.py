"""A run on Ray through the real CLI, its console, and the finished run read exactly as a user would with Ray
Data: each folder of the run is one data set, and tensor columns arrive as [n, *shape] float32 batches. (The
pandas side and the local console are in test_outputs.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raypipe import layout, storage
from raypipe.layout import RunLayout

pytestmark = [pytest.mark.ray]

# Two training shards, so that a folder holds several files; two Ray Train workers a route.
SMALL = ["data.shard_rows=700", "initial.epochs=3", "f_ft.epochs=2", "run.routes=[f_ft]", "run.device=cpu"]
ON_RAY = ["run.executor=ray", "ray.num_workers=2"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def console_and_run(tmp_path_factory, ray_cluster):
    out = str(tmp_path_factory.mktemp("ray_outputs") / "run")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = ["run", "--out", out, *SMALL, *ON_RAY, f"ray.address={ray_cluster}"]
    done = subprocess.run(
        [sys.executable, "-m", "raypipe.cli", *argv], capture_output=True, text=True, env=env, cwd=REPO, timeout=900
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done.stdout + done.stderr, RunLayout(out)


@pytest.fixture(scope="module")
def finished(console_and_run):
    return console_and_run[1]


def test_the_ray_console_shows_each_epoch_once_and_no_train_reports(console_and_run):
    console, _ = console_and_run
    for route, epochs in (("initial", 3), ("f_ft", 2)):
        for epoch in range(1, epochs + 1):
            assert console.count(f"[{route}] epoch {epoch}/{epochs} loss ") == 1, (route, epoch, console)
    assert "Reporting training result" not in console


def _folders(run: RunLayout) -> dict[str, tuple[str, int]]:
    rows = storage.read_manifest(run.stage("data"))["summary"]["rows"]
    data, partition = run.stage("data"), run.stage("partition")
    return {
        "train": (layout.split_dir(data, "train"), rows["train"]),
        "val": (layout.split_dir(data, "val"), rows["val"]),
        "test": (layout.split_dir(data, "test"), rows["test"]),
        "split": (layout.partition_dir(partition), rows["train"]),
        "issues": (layout.label_issues_dir(partition), rows["train"]),
        "signals": (layout.signals_dir(partition), rows["train"]),
    }


def test_every_folder_is_one_data_set_for_ray_data_and_pandas(finished, ray_cluster):
    import ray

    folders = _folders(finished)
    assert len(storage.list_files(folders["train"][0], ".parquet")) == 2
    for name, (folder, n_rows) in folders.items():
        ds = ray.data.read_parquet(folder)
        assert ds.count() == n_rows, name
        frame = pd.read_parquet(folder)
        assert len(frame) == n_rows and frame["sample_id"].is_unique, name
        ray_ids = np.sort(ds.to_pandas()["sample_id"].to_numpy())
        np.testing.assert_array_equal(ray_ids, np.sort(frame["sample_id"].to_numpy()))


def test_tensor_columns_are_float32_batches_in_ray_data(finished, ray_cluster):
    import ray

    from raypipe.stages.data import read_split

    train_dir = _folders(finished)["train"][0]
    batch = ray.data.read_parquet(train_dir).take_batch(16, batch_format="numpy")
    assert batch["x"].shape == (16, 1, 8, 8) and batch["x"].dtype == np.float32
    train = read_split(finished.stage("data"), "train")
    by_id = {int(i): k for k, i in enumerate(train.sample_id)}
    np.testing.assert_array_equal(batch["x"], train.x[[by_id[int(i)] for i in batch["sample_id"]]])
    shards = storage.list_files(finished.stage("attribution"), ".parquet")
    probe = ray.data.read_parquet(shards).take_batch(8, batch_format="numpy")["probe"]
    assert probe.shape == (8, 256) and probe.dtype == np.float32
