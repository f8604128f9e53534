"""Stage `attribution`: per-sample probe activations and attribution vectors, shard by shard.

Each output shard (in ``samples/``, `raypipe.layout.attribution_dir`) has the name of its data shard and one
row per sample of it: sample_id, label,
pred_label, pred_prob, given_prob, best_other_label (the likeliest class besides the given one), loss,
probe [d], attribution [m], ``probe_<name>`` [d] for every
further model the pass reads (the initial model at an early epoch: ``probe_early``), and the ground
truth columns when the data has them, for scoring only. A shard file is published atomically, so a
rerun after a crash skips every shard already written and computes only the rest.

With `keep_features` each shard also keeps the backbone's output for its samples (sample_id, label,
features [F]) under ``features/`` (`raypipe.layout.features_dir`), written before the shard itself:
L-FT trains the head on them instead of running the frozen backbone again (`read_features`).

The validation split goes through the same pass (``val/``, `raypipe.layout.val_attribution_file`), so the
partition can detect its wrong labels too and the routes be compared on its samples detected as clean.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raypipe import layout, storage
from raypipe.core.attribution import attribute_batch
from raypipe.core.models import ProbedModel
from raypipe.data import batch_from_table
from raypipe.tables import columns_from_table, row_width, table_from_columns
from raypipe.training.checkpoint import load_model
from raypipe.training.loop import resolve_device


@dataclass(frozen=True)
class AttributionPass:
    """What one attribution pass computes with: the model, the rule, the batch size, the device, whether
    it keeps the backbone's features for L-FT, and the further models whose probe activations it adds
    ((name, model URI) pairs: a tuple, so that the pass is hashable, as the Ray workers' model cache needs)."""

    model_uri: str
    rule: str
    batch_size: int
    device: str = "cpu"
    keep_features: bool = False
    probe_models: tuple[tuple[str, str], ...] = ()

    def attributor(self) -> ShardAttributor:
        return ShardAttributor(
            self.model_uri, self.rule, self.batch_size, self.device, self.keep_features, dict(self.probe_models)
        )


class ShardAttributor:
    """Holds the model (and any further models, each loaded once) and attributes whole shards: the body of an
    actor. probe_models: name -> checkpoint URI of models whose probe activations are added as ``probe_<name>``
    in the same pass over the data."""

    def __init__(
        self,
        model_uri: str,
        rule: str,
        batch_size: int,
        device: str = "cpu",
        keep_features: bool = False,
        probe_models: dict[str, str] | None = None,
    ):
        self.device = resolve_device(device)
        model, self.signature, _ = load_model(model_uri)
        self.model: ProbedModel = model.to(self.device).eval()
        self.probe_models = {
            name: load_model(uri, expect=self.signature)[0].to(self.device).eval()
            for name, uri in (probe_models or {}).items()
        }
        self.rule = rule
        self.batch_size = batch_size
        self.keep_features = keep_features

    def __call__(self, in_uri: str, out_uri: str) -> int:
        fs, path = storage.resolve(in_uri)
        shape = self.signature["input_shape"]
        parts: dict[str, list[np.ndarray]] = {}
        with fs.open_input_file(path) as f:
            # Stream the shard in record batches: memory is one batch, whatever the shard size.
            for record_batch in pq.ParquetFile(f).iter_batches(batch_size=self.batch_size):
                batch = batch_from_table(pa.Table.from_batches([record_batch]), shape)
                out = attribute_batch(self.model, batch, self.rule, self.device, self.keep_features)
                for name, model in self.probe_models.items():
                    out[f"probe_{name}"] = probe_activations(model, batch["x"], self.device)
                for key, value in out.items():
                    parts.setdefault(key, []).append(value)
        columns = {key: np.concatenate(values) for key, values in parts.items()}
        if self.keep_features:  # before the shard: a published shard always has its features
            kept = {"sample_id": columns["sample_id"], "label": columns["label"], "features": columns.pop("features")}
            storage.write_table(layout.features_shard(out_uri), table_from_columns(kept))
        storage.write_table(out_uri, table_from_columns(columns))
        return len(columns["sample_id"])


@torch.no_grad()
def probe_activations(model: ProbedModel, x: np.ndarray, device) -> np.ndarray:
    """x [B, *shape] -> float32 [B, d], the model's pre-ReLU probe activations (eval mode)."""
    h = model.probe(model.features(torch.tensor(x, dtype=torch.float32, device=device)))
    return h.cpu().numpy().astype(np.float32)


def shards(attribution_uri: str) -> list[str]:
    """The attribution stage's per-sample shards, in shard order."""
    return storage.list_files(layout.attribution_dir(attribution_uri), ".parquet")


def pending_shards(data_shards: list[str], attribution_uri: str) -> list[tuple[str, str]]:
    """(input shard, output shard) pairs whose output does not exist yet."""
    jobs = []
    for in_uri in data_shards:
        target = storage.join(layout.attribution_dir(attribution_uri), in_uri.rsplit("/", 1)[-1])  # its own name
        if not storage.exists(target):
            jobs.append((in_uri, target))
    return jobs


def attribute_val(executor, spec: AttributionPass, data_uri: str, out_uri: str, val_rows: int) -> int:
    """The validation split through the same pass as the training shards (without features), unless it is done
    or empty: its own detection in the partition -> rows written."""
    target = layout.val_attribution_file(out_uri)
    if val_rows == 0 or storage.exists(target):
        return 0
    return executor.attribute(
        dataclasses.replace(spec, keep_features=False), [(layout.split_file(data_uri, "val"), target)]
    )


def read_features(attribution_uri: str, ids: np.ndarray, max_bytes: int) -> dict[str, np.ndarray] | None:
    """The kept features of the samples in `ids` (sorted), in shard order -> {sample_id, label, features
    [n, F] float32}; None when a shard has none (the attribution ran without `keep_features`) or they
    would take more than `max_bytes`."""
    samples = shards(attribution_uri)
    kept = [layout.features_shard(uri) for uri in samples]
    if not samples or not all(storage.exists(uri) for uri in kept):
        return None
    fs, path = storage.resolve(kept[0])
    width = row_width(pq.read_schema(path, filesystem=fs).field("features").type)
    if len(ids) * width * 4 > max_bytes:
        return None
    parts = []
    for uri in kept:
        cols = columns_from_table(storage.read_table(uri))
        keep = np.isin(cols["sample_id"], ids)
        parts.append({k: v[keep] for k, v in cols.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in ("sample_id", "label", "features")}
