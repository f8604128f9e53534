"""Stage `attribution`: per-sample probe activations and attribution vectors, shard by shard.

Each output shard has the name of its data shard and one row per sample of it: sample_id, label,
pred_label, pred_prob, given_prob, loss, probe [d], attribution [m], ``probe_<name>`` [d] for every
further model the pass reads (the initial model at an early epoch: ``probe_early``), and the ground
truth columns when the data has them, for scoring only. A shard file is published atomically, so a
rerun after a crash skips every shard already written and computes only the rest.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raypipe import storage
from raypipe.core.attribution import attribute_batch
from raypipe.core.models import ProbedModel
from raypipe.data import batch_from_table
from raypipe.tables import table_from_columns
from raypipe.training.checkpoint import load_model
from raypipe.training.loop import resolve_device


class ShardAttributor:
    """Holds the model (and any further models, each loaded once) and attributes whole shards: the body of an
    actor. probe_models: name -> checkpoint URI of models whose probe activations are added as ``probe_<name>``
    in the same pass over the data."""

    def __init__(
        self, model_uri: str, rule: str, batch_size: int, device: str = "cpu", probe_models: dict | None = None
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

    def __call__(self, in_uri: str, out_uri: str) -> int:
        fs, path = storage.resolve(in_uri)
        shape = self.signature["input_shape"]
        parts: dict[str, list[np.ndarray]] = {}
        with fs.open_input_file(path) as f:
            # Stream the shard in record batches: memory is one batch, whatever the shard size.
            for record_batch in pq.ParquetFile(f).iter_batches(batch_size=self.batch_size):
                batch = batch_from_table(pa.Table.from_batches([record_batch]), shape)
                out = attribute_batch(self.model, batch, self.rule, self.device)
                for name, model in self.probe_models.items():
                    out[f"probe_{name}"] = probe_activations(model, batch["x"], self.device)
                for key, value in out.items():
                    parts.setdefault(key, []).append(value)
        columns = {key: np.concatenate(values) for key, values in parts.items()}
        storage.write_table(out_uri, table_from_columns(columns))
        return len(columns["sample_id"])


@torch.no_grad()
def probe_activations(model: ProbedModel, x: np.ndarray, device) -> np.ndarray:
    """x [B, *shape] -> float32 [B, d], the model's pre-ReLU probe activations (eval mode)."""
    h = model.probe(model.features(torch.tensor(x, dtype=torch.float32, device=device)))
    return h.cpu().numpy().astype(np.float32)


def pending_shards(data_shards: list[str], out_uri: str) -> list[tuple[str, str]]:
    """(input shard, output shard) pairs whose output does not exist yet."""
    jobs = []
    for in_uri in data_shards:
        target = storage.join(out_uri, in_uri.rsplit("/", 1)[-1])  # the data shard's own name
        if not storage.exists(target):
            jobs.append((in_uri, target))
    return jobs
