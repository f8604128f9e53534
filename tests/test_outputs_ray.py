"""A finished run read exactly as a user would with Ray Data: each folder of the run is one data set, and
tensor columns arrive as [n, *shape] float32 batches. (The pandas side is in test_outputs.py.)"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import raypipe
from raypipe import layout, storage
from raypipe.config import load_config
from raypipe.layout import RunLayout

pytestmark = [pytest.mark.ray]

# Two training shards, so that a folder holds several files; the local executor: Ray only reads here.
SMALL = ["data.shard_rows=700", "initial.epochs=3", "f_ft.epochs=1", "run.routes=[f_ft]", "run.device=cpu"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ray_outputs") / "run")
    raypipe.run(load_config(None, SMALL), out, log=lambda *_: None)
    return RunLayout(out)


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
