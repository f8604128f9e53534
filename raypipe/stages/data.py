"""Stage `data`: load the source, split, inject the experiment's noise, write Parquet.

The noise goes into the built-in data sets only, unless noise.apply_to=any (`raypipe.data.injected_noise`): a
user's own table is used as it is.

Output (`raypipe.layout`): ``train/part-NNNNN.parquet`` (shards of data.shard_rows rows, the unit of
parallel and resumable work downstream), ``val/part-00000.parquet``, ``test/part-00000.parquet``: one folder
a split, so each reads back whole with pandas or Ray Data. The test split is never
corrupted; the validation split gets the same kind of noise as training, since it stands for what a
user holds out from their own (noisy) data.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raypipe import layout, storage
from raypipe.config import DataConfig, NoiseConfig
from raypipe.data import (
    SampleSet,
    apply_noise,
    describe_noise,
    injected_noise,
    labels_of_test_split,
    load_splits,
    sample_format,
    samples_from_table,
    table_from_samples,
)


def run(data_cfg: DataConfig, noise_cfg: NoiseConfig, out_uri: str, log=print) -> dict[str, Any]:
    noise_cfg = injected_noise(noise_cfg, data_cfg.source)
    splits = load_splits(data_cfg)
    train = apply_noise(splits["train"], noise_cfg, data_cfg.source)
    val_noise = dataclasses.replace(noise_cfg, seed=noise_cfg.seed + 1)
    val = apply_noise(splits["val"], val_noise, data_cfg.source) if len(splits["val"]) else splits["val"]
    test = splits["test"]
    n_shards = max(1, -(-len(train) // data_cfg.shard_rows))
    for k in range(n_shards):
        index = np.arange(k * data_cfg.shard_rows, min((k + 1) * data_cfg.shard_rows, len(train)))
        shard = layout.shard_name(k)
        storage.write_table(storage.join(layout.train_dir(out_uri), shard), table_from_samples(train.subset(index)))
    storage.write_table(layout.split_file(out_uri, "val"), table_from_samples(val))
    storage.write_table(layout.split_file(out_uri, "test"), table_from_samples(test))
    log(
        f"[data] {data_cfg.source}: train {len(train)} ({describe_noise(noise_cfg)}, {int(train.is_corrupted.sum())} "
        f"known corrupted), val {len(val)}, test {len(test)}, {n_shards} shards"
    )
    return {
        "rows": {"train": len(train), "val": len(val), "test": len(test)},
        "n_corrupted": int(train.is_corrupted.sum()),
        "noise_injected": describe_noise(noise_cfg),
        "sample_shape": list(train.sample_shape),
        "num_classes": int(train.num_classes),
        "n_shards": n_shards,
        "test_labels": labels_of_test_split(data_cfg),  # which labels every test accuracy is measured against
        "ground_truth": ground_truth(data_cfg, noise_cfg),
        # what predicting the most common class alone scores on the test split (the report's chance level)
        "test_majority_fraction": float(np.bincount(test.label).max() / len(test)) if len(test) else 0.0,
    }


def ground_truth(data_cfg: DataConfig, noise_cfg: NoiseConfig) -> str | None:
    """Where the training samples' ground truth (true_label, is_corrupted) comes from; None: it is unknown (a
    user's own data with no noise injected and no true labels), so the detection cannot be scored. `noise_cfg`:
    the noise injected (`injected_noise`)."""
    known = []
    if noise_cfg.kind != "none" and noise_cfg.rate > 0:
        known.append(f"the {noise_cfg.kind} noise raypipe injected")
    if data_cfg.true_label_column is not None:
        known.append(f"the true labels of data.true_label_column '{data_cfg.true_label_column}'")
    if data_cfg.source != "parquet":
        known.append(f"the {data_cfg.source} labels, taken as clean")
    return " and ".join(known) or None


def train_shards(data_uri: str) -> list[str]:
    return storage.list_files(layout.train_dir(data_uri), ".parquet")


def train_format(data_uri: str) -> tuple[tuple[int, ...], int]:
    """(sample shape, class count) of the training samples, from the first shard's schema (no rows read)."""
    fs, path = storage.resolve(train_shards(data_uri)[0])
    return sample_format(pq.read_schema(path, filesystem=fs))


def read_split(data_uri: str, name: str) -> SampleSet:
    """`train` (all shards, concatenated in order), `val` or `test`."""
    if name != "train":
        return samples_from_table(storage.read_table(layout.split_file(data_uri, name)))
    tables = [storage.read_table(uri) for uri in train_shards(data_uri)]
    table = pa.concat_tables(tables).replace_schema_metadata(tables[0].schema.metadata)
    return samples_from_table(table)


def train_sample_ids(data_uri: str) -> np.ndarray:
    """int64 [N]: every training sample's id, in shard order (reads one column)."""
    parts = [storage.read_table(uri, columns=["sample_id"]).column("sample_id") for uri in train_shards(data_uri)]
    return np.concatenate([np.asarray(p.to_numpy(), dtype=np.int64) for p in parts])
