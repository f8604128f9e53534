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

# Two training shards, so that a folder holds several files; two Ray Train workers a route; L-FT, so that the
# attribution keeps the backbone's features.
SMALL = [
    "data.shard_rows=700",
    "initial.epochs=3",
    "f_ft.epochs=2",
    "l_ft.epochs=2",
    "run.routes=[l_ft,f_ft]",
    "run.device=cpu",
]
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
    for route, epochs in (("initial", 3), ("l_ft", 2), ("f_ft", 2)):
        for epoch in range(1, epochs + 1):
            assert console.count(f"[{route}] epoch {epoch}/{epochs} loss ") == 1, (route, epoch, console)
    assert "Reporting training result" not in console
    # Ray Train's own INFO lines (ray.train.LoggingConfig at WARNING): its worker groups, devices, process groups.
    for line in ("training worker group", "Requesting resources", "Moving model to device", "Setting up process group"):
        assert line not in console, line


def test_every_folder_is_one_data_set_for_ray_data_and_pandas(finished, ray_cluster, data_set_folders):
    import ray

    root = Path(finished.root)
    folders = data_set_folders(root)
    assert {"attribution/samples", "attribution/features", "partition/issues", "data/train"} <= set(folders)
    # data (3), trajectory, attribution (samples, features, val), partition (split, signals, issues, val, val_cleaned)
    assert len(folders) == 12, folders
    assert len(storage.list_files(str(root / "data" / "train"), ".parquet")) == 2
    train_ids = np.sort(pd.read_parquet(root / "data" / "train")["sample_id"].to_numpy())
    for name, n_rows in folders.items():
        ds = ray.data.read_parquet(str(root / name))
        assert ds.count() == n_rows, name
        frame = pd.read_parquet(root / name)
        assert len(frame) == n_rows and frame["sample_id"].is_unique, name
        ray_ids = np.sort(ds.to_pandas()["sample_id"].to_numpy())
        np.testing.assert_array_equal(ray_ids, np.sort(frame["sample_id"].to_numpy()))
        if n_rows == len(train_ids):
            np.testing.assert_array_equal(ray_ids, train_ids, err_msg=name)


def test_tensor_columns_are_float32_batches_in_ray_data(finished, ray_cluster):
    import ray

    from raypipe.stages.data import read_split

    train_dir = layout.train_dir(finished.stage("data"))
    batch = ray.data.read_parquet(train_dir).take_batch(16, batch_format="numpy")
    assert batch["x"].shape == (16, 1, 8, 8) and batch["x"].dtype == np.float32
    train = read_split(finished.stage("data"), "train")
    by_id = {int(i): k for k, i in enumerate(train.sample_id)}
    np.testing.assert_array_equal(batch["x"], train.x[[by_id[int(i)] for i in batch["sample_id"]]])
    samples = layout.attribution_dir(finished.stage("attribution"))
    probe = ray.data.read_parquet(samples).take_batch(8, batch_format="numpy")["probe"]
    assert probe.shape == (8, 256) and probe.dtype == np.float32
