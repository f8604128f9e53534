"""Stage `data`: load the source, split, inject the experiment's noise, write Parquet.

Output under ``<run>/data/``: ``train/part-NNNNN.parquet`` (shards of data.shard_rows rows, the
unit of parallel and resumable work downstream), ``val.parquet``, ``test.parquet``. The test split
is never corrupted; the validation split gets the same kind of noise as training, since it stands
for what a user holds out from their own (noisy) data.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from raypipe import storage
from raypipe.config import Config
from raypipe.data import SampleSet, apply_noise, load_splits, samples_from_table, table_from_samples


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def run(config: Config, out_uri: str, log=print) -> dict[str, Any]:
    splits = load_splits(config.data)
    train = apply_noise(splits["train"], config.noise, config.data.source)
    val_noise = dataclasses.replace(config.noise, seed=config.noise.seed + 1)
    val = apply_noise(splits["val"], val_noise, config.data.source) if len(splits["val"]) else splits["val"]
    test = splits["test"]
    n_shards = max(1, -(-len(train) // config.data.shard_rows))
    for k in range(n_shards):
        index = np.arange(k * config.data.shard_rows, min((k + 1) * config.data.shard_rows, len(train)))
        storage.write_table(storage.join(out_uri, "train", shard_name(k)), table_from_samples(train.subset(index)))
    storage.write_table(storage.join(out_uri, "val.parquet"), table_from_samples(val))
    storage.write_table(storage.join(out_uri, "test.parquet"), table_from_samples(test))
    log(
        f"[data] {config.data.source}: train {len(train)} ({int(train.is_corrupted.sum())} corrupted, "
        f"{config.noise.kind} {config.noise.rate}), val {len(val)}, test {len(test)}, {n_shards} shards"
    )
    return {
        "rows": {"train": len(train), "val": len(val), "test": len(test)},
        "n_corrupted": int(train.is_corrupted.sum()),
        "sample_shape": list(train.sample_shape),
        "num_classes": int(train.num_classes),
        "n_shards": n_shards,
    }


def train_shards(data_uri: str) -> list[str]:
    return storage.list_files(storage.join(data_uri, "train"), ".parquet")


def read_split(data_uri: str, name: str) -> SampleSet:
    """`train` (all shards, concatenated in order), `val` or `test`."""
    if name != "train":
        return samples_from_table(storage.read_table(storage.join(data_uri, f"{name}.parquet")))
    import pyarrow as pa

    tables = [storage.read_table(uri) for uri in train_shards(data_uri)]
    table = pa.concat_tables(tables).replace_schema_metadata(tables[0].schema.metadata)
    return samples_from_table(table)
