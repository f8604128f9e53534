"""Stage `partition`: p_noisy for every training sample, the clean / noisy split, label issues.

1. fit: a uniform sample of at most partition.max_fit_rows attribution rows (drawn shard by
   shard, so no worker or driver ever holds all rows) -> standardize (+PCA) -> 2-component mixture;
2. score: every attribution shard -> ``<run>/partition/part-NNNNN.parquet`` (sample_id, label,
   pred_label, p_noisy, is_clean), in parallel, the small fitted mixture shipped to each worker;
3. ``label_issues.parquet``: the flagged samples, most suspect first, with a suggested label
   (the model's prediction), what a cleanlab user expects to act on.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raypipe import storage
from raypipe.config import PartitionConfig
from raypipe.partition import MixtureFit, check_clean_side, detection_metrics, fit_mixture, split
from raypipe.tables import columns_from_table, table_from_columns


def sample_shard(uri: str, keep_probability: float, seed: int) -> dict[str, np.ndarray]:
    """A Bernoulli(keep_probability) sample of one attribution shard's (attribution, loss) rows."""
    table = storage.read_table(uri, columns=["sample_id", "attribution", "loss"])
    cols = columns_from_table(table)
    # Seeded by sample ids, not by shard order: the same rows are drawn wherever this runs.
    rng = np.random.default_rng([seed, int(cols["sample_id"][0]) if len(cols["sample_id"]) else 0])
    keep = rng.random(len(cols["sample_id"])) < keep_probability
    return {k: v[keep] for k, v in cols.items()}


def score_shard(in_uri: str, out_uri: str, fit: MixtureFit, tau: float) -> dict[str, Any]:
    """One attribution shard -> one partition shard; returns its counts."""
    keep = ["sample_id", "label", "pred_label", "attribution", "true_label", "is_corrupted"]
    table = storage.read_table(in_uri)
    cols = columns_from_table(table, [c for c in keep if c in table.column_names])
    p_noisy = fit.p_noisy(cols.pop("attribution"))
    out = {**cols, "p_noisy": p_noisy, "is_clean": split(p_noisy, tau)}
    storage.write_table(out_uri, table_from_columns(out))
    return {"rows": len(p_noisy), "n_clean": int(out["is_clean"].sum())}


def fit(attribution_shards: list[str], n_rows: int, cfg: PartitionConfig, seed: int, executor) -> MixtureFit:
    keep_probability = min(1.0, cfg.max_fit_rows / max(n_rows, 1))
    parts = executor.map(lambda uri: sample_shard(uri, keep_probability, seed), attribution_shards, "fit sample")
    attribution = np.concatenate([p["attribution"] for p in parts])
    loss = np.concatenate([p["loss"] for p in parts])
    return fit_mixture(attribution, loss, cfg, seed)


def run(attribution_uri: str, out_uri: str, cfg: PartitionConfig, seed: int, n_rows: int, executor, log=print):
    shards = storage.list_files(attribution_uri, ".parquet")
    mixture = fit(shards, n_rows, cfg, seed, executor)
    jobs = [(uri, storage.join(out_uri, uri.rsplit("/", 1)[-1])) for uri in shards]
    executor.map(lambda job: score_shard(job[0], job[1], mixture, cfg.tau), jobs, "score")

    # The driver reads back only a few scalar columns per sample (not the vectors).
    table = read_partition(out_uri)
    cols = columns_from_table(table)
    is_clean = cols["is_clean"].astype(bool)
    check_clean_side(is_clean, cfg)
    flagged = np.flatnonzero(~is_clean)
    order = flagged[np.argsort(-cols["p_noisy"][flagged], kind="stable")]
    issues = {
        "sample_id": cols["sample_id"][order],
        "given_label": cols["label"][order],
        "suggested_label": cols["pred_label"][order],
        "p_noisy": cols["p_noisy"][order],
    }
    storage.write_table(storage.join(out_uri, "label_issues.parquet"), table_from_columns(issues))
    storage.write_json(storage.join(out_uri, "mixture.json"), mixture.describe())
    summary: dict[str, Any] = {
        "n_clean": int(is_clean.sum()),
        "n_noisy": int((~is_clean).sum()),
        "tau": cfg.tau,
        "mixture": {
            k: v for k, v in mixture.describe().items() if k in ("weights", "noisy_component", "component_mean_loss")
        },
    }
    if "is_corrupted" in cols:
        summary["detection"] = detection_metrics(cols["is_corrupted"], cols["p_noisy"], cfg.tau)
    det = summary.get("detection")
    log(
        f"[partition] clean {summary['n_clean']}, noisy {summary['n_noisy']}"
        + (f"; detection F1 {det['f1']:.3f} AUROC {det['auroc']:.3f}" if det else "")
    )
    return summary


def read_partition(partition_uri: str, columns: list[str] | None = None):
    import pyarrow as pa

    cols = columns or ["sample_id", "label", "pred_label", "p_noisy", "is_clean"]
    tables = []
    for uri in storage.list_files(partition_uri, ".parquet"):
        if uri.endswith("label_issues.parquet"):
            continue
        t = storage.read_table(uri)
        tables.append(t.select([c for c in [*cols, "is_corrupted", "true_label"] if c in t.column_names]))
    return pa.concat_tables(tables)
