"""Stage `prune`: the sensitivity regression from per-shard sufficient statistics, then persistent
pruning of the top prune.fraction probe neurons by |beta|.

Each shard's statistics (X^T X etc., O(d^2)) are computed where the shard is read; only those small
sums reach the driver, which merges and solves. Output: ``model.pt`` and
``neurons.json`` (beta, the pruned neurons in rank order).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raypipe import layout, storage
from raypipe.config import PruneConfig
from raypipe.core.pruning import check_prune_fraction, prune_count, prune_neurons, pruned_mask
from raypipe.core.sensitivity import SufficientStats, rank_neurons
from raypipe.stages.attribution import shards as attribution_shards
from raypipe.tables import columns_from_table
from raypipe.training.checkpoint import load_model, save_model


def shard_stats(attribution_uri: str, partition_uri: str, target: str, activation: str) -> dict[str, np.ndarray]:
    """The regression's sufficient statistics of one shard: its probe activations [B, d] (pre-ReLU as stored, or
    through the ReLU) against its target [B]."""
    probe = columns_from_table(storage.read_table(attribution_uri, columns=["sample_id", "probe"]))
    part = columns_from_table(storage.read_table(partition_uri, columns=["sample_id", "p_noisy", "is_clean"]))
    if not np.array_equal(probe["sample_id"], part["sample_id"]):
        raise RuntimeError(f"shards '{attribution_uri}' and '{partition_uri}' do not hold the same samples")
    y = part["p_noisy"] if target == "p_noisy" else (~part["is_clean"].astype(bool)).astype(np.float64)
    x = probe["probe"] if activation == "pre_relu" else np.maximum(probe["probe"], 0.0)
    return SufficientStats(x.shape[1]).update(x, y).to_dict()


def run(
    model_uri: str, attribution_uri: str, partition_uri: str, out_uri: str, cfg: PruneConfig, executor, log=print
) -> dict[str, Any]:
    model, signature, _ = load_model(model_uri)
    shards = attribution_shards(attribution_uri)
    jobs = [(uri, storage.join(layout.partition_dir(partition_uri), uri.rsplit("/", 1)[-1])) for uri in shards]
    parts = executor.map(lambda job: shard_stats(job[0], job[1], cfg.target, cfg.activation), jobs, "sensitivity")
    stats = SufficientStats(model.probe_width)
    for part in parts:
        stats.merge(SufficientStats.from_dict(part))
    beta, intercept = stats.solve()
    check_prune_fraction(cfg.fraction, model.probe_width)  # before any work too (raypipe.preflight)
    n_prune = prune_count(cfg.fraction, model.probe_width)
    neurons = rank_neurons(beta, n_prune, pruned_mask(model))
    prune_neurons(model, neurons)
    save_model(layout.model_file(out_uri), model, signature, {"pruned_neurons": neurons.tolist()})
    storage.write_json(
        layout.neurons_file(out_uri),
        {
            "pruned": neurons.tolist(),
            "beta": beta.tolist(),
            "intercept": intercept,
            "target": cfg.target,
            "activation": cfg.activation,
        },
    )
    log(
        f"[prune] {len(neurons)} of {model.probe_width} probe neurons pruned "
        f"(regression of {cfg.target} on {cfg.activation} activations, n={stats.n})"
    )
    return {"n_pruned": int(len(neurons)), "probe_width": model.probe_width, "n_rows": stats.n}
