"""Stage `partition`: p_noisy for every training sample, the clean / noisy split, label issues.

1. signals, per shard in parallel -> ``signals/part-NNNNN.parquet``: the attribution
   mixture's p_noisy (standardize (+PCA) -> 2-component mixture fitted on a uniform sample of at
   most partition.max_fit_rows rows, drawn shard by shard), the loss, and the kNN label agreement
   against a reference index (at most detection.max_reference rows) shipped to every worker;
2. decision, on the driver, from a few scalars per sample: the signal(s) detection.signal names,
   combined without ground truth for `auto`, then a per-class decision (raypipe.core.detection);
3. ``part-NNNNN.parquet`` (sample_id, label, pred_label, suggested_label, p_noisy,
   is_clean), aligned with the attribution shards, and ``label_issues.parquet``: the flagged
   samples, most suspect first, with a suggested label (the neighbours' majority when kNN ran,
   else the model's prediction) and the signal that flagged them, for a user to act on.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from raypipe import layout, storage
from raypipe.config import DetectionConfig, PartitionConfig
from raypipe.core.detection import KnnIndex, class_conditional_flags, combine_signals
from raypipe.core.metrics import detection_metrics
from raypipe.core.mixture import MixtureFit, check_clean_side, fit_mixture, split
from raypipe.errors import RaypipeError
from raypipe.tables import columns_from_table, table_from_columns


def sample_shard(uri: str, keep_probability: float, seed: int) -> dict[str, np.ndarray]:
    """A Bernoulli(keep_probability) sample of one attribution shard's (attribution, loss) rows."""
    table = storage.read_table(uri, columns=["sample_id", "attribution", "loss"])
    cols = columns_from_table(table)
    # Seeded by sample ids, not by shard order: the same rows are drawn wherever this runs.
    rng = np.random.default_rng([seed, int(cols["sample_id"][0]) if len(cols["sample_id"]) else 0])
    keep = rng.random(len(cols["sample_id"])) < keep_probability
    return {k: v[keep] for k, v in cols.items()}


def reference_rows(uri: str, keep_probability: float, seed: int) -> dict[str, np.ndarray]:
    """A Bernoulli(keep_probability) sample of one shard's (sample_id, probe, label): kNN reference rows."""
    cols = columns_from_table(storage.read_table(uri, columns=["sample_id", "probe", "label"]))
    rng = np.random.default_rng([seed, 7, int(cols["sample_id"][0]) if len(cols["sample_id"]) else 0])
    keep = rng.random(len(cols["sample_id"])) < keep_probability
    return {k: v[keep] for k, v in cols.items()}


def build_knn_index(shards: list[str], n_rows: int, det: DetectionConfig, num_classes: int, seed: int, executor):
    """The reference set: all rows, or a uniform sample of about det.max_reference (driver memory bounded)."""
    keep_probability = min(1.0, det.max_reference / max(n_rows, 1))
    parts = executor.map(lambda uri: reference_rows(uri, keep_probability, seed), shards, "knn reference")
    ref = {k: np.concatenate([p[k] for p in parts]) for k in ("sample_id", "probe", "label")}
    return KnnIndex.build(ref["probe"], ref["label"], num_classes, ref_ids=ref["sample_id"])


def signal_shard(in_uri: str, out_uri: str, fit: MixtureFit, index: KnnIndex | None, det: DetectionConfig) -> int:
    """One attribution shard -> its per-sample signals (scalars only): the attribution mixture's
    p_noisy, the loss, and the kNN label agreement with the neighbours' majority label."""
    keep = ["sample_id", "label", "pred_label", "loss", "attribution", "probe", "true_label", "is_corrupted"]
    table = storage.read_table(in_uri)
    cols = columns_from_table(table, [c for c in keep if c in table.column_names])
    cols["p_attribution"] = fit.p_noisy(cols.pop("attribution"))
    probe = cols.pop("probe")  # [B, d]
    if index is not None:
        votes = index.votes(probe, cols["label"], det.k, query_ids=cols["sample_id"], class_balanced=det.class_balanced)
        cols["knn_agreement"] = votes.agreement.astype(np.float32)
        cols["knn_suggested"] = votes.suggested_label.astype(np.int64)
    storage.write_table(out_uri, table_from_columns(cols))
    return len(cols["sample_id"])


def read_trajectory(trajectory_uri: str | None, sample_id: np.ndarray) -> dict[str, np.ndarray]:
    """-AUM and the early loss aligned to `sample_id`, when the initial training recorded them."""
    if trajectory_uri is None or not storage.list_files(trajectory_uri, ".parquet"):
        return {}
    t = columns_from_table(
        pa.concat_tables([storage.read_table(u) for u in storage.list_files(trajectory_uri, ".parquet")])
    )
    order = np.argsort(t["sample_id"])
    pos = np.searchsorted(t["sample_id"], sample_id, sorter=order)
    pos = order[np.minimum(pos, len(order) - 1)]
    if not np.array_equal(t["sample_id"][pos], sample_id):
        return {}  # a partial trajectory (e.g. a shard too big to cache on a worker): not a usable signal
    out = {"aum": -t["aum"][pos]}  # higher = more suspect
    if np.isfinite(t["early_loss"][pos]).all():
        out["early_loss"] = t["early_loss"][pos]
    return out if np.isfinite(out["aum"]).all() else {}


def decide(signals: dict[str, np.ndarray], labels: np.ndarray, num_classes: int, det: DetectionConfig, seed: int):
    """-> (p_noisy [N], signals_used) from the chosen signal(s), per det.signal and det.decision."""
    if det.signal == "attribution":
        return signals["attribution"], {"signal": "attribution", "decision": "attribution mixture"}
    if det.signal == "auto":
        score, used = combine_signals(signals, seed=seed)
        used = {"signal": "auto", **used}
    else:
        name = {"knn": "knn", "trajectory": "aum"}[det.signal]
        if name not in signals:
            raise RaypipeError(
                "detection.signal=trajectory needs the training trajectory, recorded only when raypipe trains the "
                "initial model (not with model.checkpoint); use detection.signal=knn or auto"
            )
        score, used = signals[name], {"signal": det.signal, "chosen": [name]}
    if det.decision == "global":
        flags = class_conditional_flags(score, np.zeros_like(labels), 1, "mixture", max_flag_fraction=None, seed=seed)
    else:
        flags = class_conditional_flags(score, labels, num_classes, det.decision, seed=seed)
    used["decision"] = det.decision
    used["classes_decided_by"] = [c.get("decided_by") for c in flags.per_class]
    return flags.p_noisy.astype(np.float32), used


def fit(attribution_shards: list[str], n_rows: int, cfg: PartitionConfig, seed: int, executor) -> MixtureFit:
    keep_probability = min(1.0, cfg.max_fit_rows / max(n_rows, 1))
    parts = executor.map(lambda uri: sample_shard(uri, keep_probability, seed), attribution_shards, "fit sample")
    attribution = np.concatenate([p["attribution"] for p in parts])
    loss = np.concatenate([p["loss"] for p in parts])
    return fit_mixture(attribution, loss, cfg, seed)


def write_split(out_uri, names, lengths, cols, p_noisy, is_clean, signal: str) -> None:
    """Partition shards (one per attribution shard, `lengths` rows each) and label_issues.parquet (the
    flagged samples, most suspect first, with a suggested label: the neighbours' majority when kNN ran,
    else the model's prediction)."""
    suggested = cols.get("knn_suggested", cols["pred_label"])
    out = {
        "sample_id": cols["sample_id"],
        "label": cols["label"],
        "pred_label": cols["pred_label"],
        "suggested_label": suggested,
        "p_noisy": p_noisy,
        "is_clean": is_clean,
        **{k: cols[k] for k in ("true_label", "is_corrupted") if k in cols},
    }
    offsets = np.cumsum([0, *lengths])
    for name, a, b in zip(names, offsets[:-1], offsets[1:], strict=True):
        storage.write_table(storage.join(out_uri, name), table_from_columns({k: v[a:b] for k, v in out.items()}))
    flagged = np.flatnonzero(~is_clean)
    order = flagged[np.argsort(-p_noisy[flagged], kind="stable")]
    issues = {
        "sample_id": cols["sample_id"][order],
        "given_label": cols["label"][order],
        "suggested_label": suggested[order],
        "p_noisy": p_noisy[order],
        "flagged_by": np.full(len(order), signal),
    }
    storage.write_table(layout.label_issues_file(out_uri), table_from_columns(issues))


def run(
    attribution_uri: str,
    out_uri: str,
    cfg: PartitionConfig,
    det: DetectionConfig,
    seed: int,
    n_rows: int,
    num_classes: int,
    trajectory_uri: str | None,
    executor,
    log=print,
) -> dict[str, Any]:
    shards = storage.list_files(attribution_uri, ".parquet")
    # 1. Per-shard signals, in parallel: the attribution mixture (fitted on a uniform sample) and kNN votes.
    mixture = fit(shards, n_rows, cfg, seed, executor)
    index = build_knn_index(shards, n_rows, det, num_classes, seed, executor) if det.signal in ("knn", "auto") else None
    names = [uri.rsplit("/", 1)[-1] for uri in shards]
    jobs = [(uri, storage.join(layout.signals_dir(out_uri), name)) for uri, name in zip(shards, names, strict=True)]
    executor.map(lambda job: signal_shard(job[0], job[1], mixture, index, det), jobs, "signals")

    # 2. The decision, on the driver: it reads back a few scalars per sample, never the vectors.
    tables = [storage.read_table(out) for _, out in jobs]
    lengths = [t.num_rows for t in tables]
    cols = columns_from_table(pa.concat_tables(tables))
    signals = {"attribution": cols["p_attribution"], "loss": cols["loss"]}
    if "knn_agreement" in cols:
        signals["knn"] = 1.0 - cols["knn_agreement"]
    signals.update(read_trajectory(trajectory_uri, cols["sample_id"]))
    p_noisy, signals_used = decide(signals, cols["label"], num_classes, det, seed)
    is_clean = split(p_noisy, cfg.tau)
    check_clean_side(is_clean, cfg)

    # 3. Partition shards aligned with the attribution shards (the prune stage joins them shard by shard).
    write_split(out_uri, names, lengths, cols, p_noisy, is_clean, signals_used["signal"])
    storage.write_json(layout.mixture_file(out_uri), mixture.describe())
    summary: dict[str, Any] = {
        "n_clean": int(is_clean.sum()),
        "n_noisy": int((~is_clean).sum()),
        "tau": cfg.tau,
        "signals_used": signals_used,
        "signals_available": sorted(signals),
        "mixture": {
            k: v for k, v in mixture.describe().items() if k in ("weights", "noisy_component", "component_mean_loss")
        },
    }
    if "is_corrupted" in cols:
        truth = cols["is_corrupted"]
        summary["detection"] = detection_metrics(truth, p_noisy, cfg.tau)
        # Each signal's AUROC alone, to read what the chosen rule gained (ground truth used only to score).
        summary["detection"]["auroc_by_signal"] = {
            name: detection_metrics(truth, np.asarray(score, dtype=np.float64), 0.5)["auroc"]
            for name, score in signals.items()
        }
    det_m = summary.get("detection")
    log(
        f"[partition] signal {signals_used['signal']} ({', '.join(signals_used.get('chosen', []) or ['mixture'])}): "
        f"clean {summary['n_clean']}, noisy {summary['n_noisy']}"
        + (f"; detection F1 {det_m['f1']:.3f} AUROC {det_m['auroc']:.3f}" if det_m else "")
    )
    return summary


def read_partition(partition_uri: str, columns: list[str] | None = None):
    import pyarrow as pa

    cols = columns or ["sample_id", "label", "pred_label", "suggested_label", "p_noisy", "is_clean"]
    tables = []
    for uri in storage.list_files(partition_uri, ".parquet"):
        if uri == layout.label_issues_file(partition_uri):
            continue
        t = storage.read_table(uri)
        tables.append(t.select([c for c in [*cols, "is_corrupted", "true_label"] if c in t.column_names]))
    return pa.concat_tables(tables)
