"""Stage `partition`: p_noisy for every training sample, the clean / noisy split, label issues.

1. signals, per shard in parallel -> ``signals/part-NNNNN.parquet``: the attribution
   mixture's p_noisy (standardize (+PCA) -> 2-component mixture fitted on a uniform sample of at
   most partition.max_fit_rows rows, drawn shard by shard), the loss, and the kNN label agreement
   against a reference index (at most detection.max_reference rows) shipped to every worker;
2. decision, on the driver, from a few scalars per sample: the signal(s) detection.signal names,
   combined without ground truth for `auto`, then a per-class decision (raypipe.core.detection);
3. ``split/part-NNNNN.parquet`` (sample_id, label, pred_label, suggested_label, relabelled_to (the relabel
   route's label, -1 for none), p_noisy, is_clean), aligned with the attribution shards, and
   ``issues/part-00000.parquet``: every training sample in the shape of cleanlab's Datalab (is_label_issue,
   label_score, given / predicted / suggested label, p_noisy, each signal's score), most suspect first;
4. the validation split's detection by the same decision (`raypipe.stages.validation`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from raypipe import layout, storage
from raypipe.config import DetectionConfig, PartitionConfig
from raypipe.core.detection import class_conditional_flags, combine_signals
from raypipe.core.detection.issues import best_other_class, label_issues_table
from raypipe.core.detection.transition import (
    empirical_transition,
    estimate_from_neighbours,
    quota_flags,
    transition_error,
)
from raypipe.core.metrics import detection_metrics
from raypipe.core.mixture import MixtureFit, check_clean_side, fit_mixture, split
from raypipe.errors import RaypipeError
from raypipe.stages.attribution import shards as attribution_shards
from raypipe.stages.signals import ProbeSpaces, gather_signals, sample_shard, signal_shard
from raypipe.stages.validation import detect_validation, relabel_summary, relabels
from raypipe.tables import columns_from_table, table_from_columns

MIXTURE_SUMMARY = ("weights", "noisy_component", "component_mean_loss")  # what the report shows of the fit


def decide(
    signals: dict[str, np.ndarray],
    labels: np.ndarray,
    num_classes: int,
    det: DetectionConfig,
    seed: int,
    transition: dict | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """-> (p_noisy [N], score [N] (higher = more suspect), signals_used) from the chosen signal(s), per det.signal,
    then decided per det.decision (`transition`: the noise transition estimate, for the quotas)."""
    if det.signal == "attribution":
        p = signals["attribution"]
        return p, p, {"signal": "attribution", "decision": "attribution mixture"}
    if det.signal == "auto":
        score, used = combine_signals(signals, seed=seed)
        used = {"signal": "auto", **used}
    else:
        name = {"knn": "knn", "fine": "fine", "trajectory": "aum"}[det.signal]
        if name not in signals:
            raise RaypipeError(
                "detection.signal=trajectory needs the training trajectory, recorded only when raypipe trains the "
                "initial model (not with model.checkpoint); use detection.signal=knn or auto"
            )
        score, used = signals[name], {"signal": det.signal, "chosen": [name]}
    method, why = choose_decision(det, transition)
    if method == "quota":
        flagged = quota_flags(score, labels, np.asarray(transition["quota"]))
        p_noisy = flagged.astype(np.float32)
    elif method == "global":
        flags = class_conditional_flags(score, np.zeros_like(labels), 1, "mixture", max_flag_fraction=None, seed=seed)
        p_noisy = flags.p_noisy
    else:
        flags = class_conditional_flags(score, labels, num_classes, method, seed=seed)
        p_noisy = flags.p_noisy
        used["classes_decided_by"] = [c.get("decided_by") for c in flags.per_class]
    used.update(decision=det.decision, decision_taken=method, decision_why=why)
    return p_noisy.astype(np.float32), np.asarray(score, dtype=np.float32), used


def choose_decision(det: DetectionConfig, transition: dict | None) -> tuple[str, str]:
    """(the decision method to apply, why): detection.decision, with `auto` resolved by the noise transition
    estimate (quota when it says the noise is class-dependent, else mixture)."""
    if det.decision not in ("auto", "quota"):
        return det.decision, f"detection.decision={det.decision}"
    if transition is None:
        return "mixture", "no noise transition estimate (no kNN neighbours were computed): per-class mixtures"
    structure = transition["structure"]
    conc = f"{structure['concentration']:.2f} (uniform: {structure['concentration_if_uniform']:.2f})"
    if det.decision == "quota":
        return "quota", f"detection.decision=quota; concentration of the estimated wrong labels {conc}"
    if structure["class_dependent"]:
        return "quota", (
            f"class-dependent noise: {conc} of each class's estimated wrong labels go to one other class "
            f"(>= {structure['min_concentration']}); each given class flags its estimated share of wrong labels"
        )
    return "mixture", (
        f"noise not class-dependent: {conc} of each class's estimated wrong labels go to one other class "
        f"(< {structure['min_concentration']}); per-class mixtures"
    )


def fit(shards: list[str], n_rows: int, cfg: PartitionConfig, seed: int, executor) -> MixtureFit:
    keep_probability = min(1.0, cfg.max_fit_rows / max(n_rows, 1))
    parts = executor.map(lambda uri: sample_shard(uri, keep_probability, seed), shards, "fit sample")
    attribution = np.concatenate([p["attribution"] for p in parts])
    loss = np.concatenate([p["loss"] for p in parts])
    return fit_mixture(attribution, loss, cfg, seed)


def suggestion_candidates(cols: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The labels a flagged sample could have instead, best first: the neighbours' majority and their likeliest
    other class (when kNN ran), the model's prediction, the model's likeliest other class (older attribution
    shards lack it)."""
    out = []
    for space in ("knn", "knn_early"):
        if f"{space}_suggested" in cols:
            out += [cols[f"{space}_suggested"], best_other_class(cols[f"{space}_counts"], cols["label"])]
    out.append(cols["pred_label"])
    if "best_other_label" in cols:
        out.append(cols["best_other_label"])
    return out


def write_split(
    out_uri, names, lengths, cols, p_noisy, is_clean, score, signals: dict[str, np.ndarray], min_vote_share=0.5
) -> np.ndarray:
    """Partition shards (one per attribution shard, `lengths` rows each) and the label issues table: every training
    sample in Datalab's shape, most suspect first (`raypipe.core.detection.issues`). -> the suggested labels, in
    the shards' order."""
    truth = {k: cols[k] for k in ("true_label", "is_corrupted") if k in cols}
    issues = label_issues_table(
        cols["sample_id"],
        cols["label"],
        cols["pred_label"],
        ~is_clean,
        p_noisy,
        score,
        signals,
        suggestion_candidates(cols),
        tie_break=cols["loss"],
        extra=truth,
    )
    by_row = np.empty(len(p_noisy), dtype=np.int64)  # issues row -> position in the shards
    by_row[np.argsort(cols["sample_id"], kind="stable")] = np.argsort(issues["sample_id"], kind="stable")
    out = {
        "sample_id": cols["sample_id"],
        "label": cols["label"],
        "pred_label": cols["pred_label"],
        "suggested_label": issues["suggested_label"][by_row],
        # the relabel route's label for a flagged sample whose suggestion is confident, else -1
        "relabelled_to": relabels(cols, ~is_clean, min_vote_share),
        "p_noisy": p_noisy,
        "is_clean": is_clean,
        **truth,
    }
    offsets = np.cumsum([0, *lengths])
    for name, a, b in zip(names, offsets[:-1], offsets[1:], strict=True):
        shard = storage.join(layout.partition_dir(out_uri), name)
        storage.write_table(shard, table_from_columns({k: v[a:b] for k, v in out.items()}))
    storage.write_table(layout.label_issues_file(out_uri), table_from_columns(issues))
    return out


def transition_estimate(cols: dict[str, np.ndarray], num_classes: int, det: DetectionConfig, seed: int):
    """The noise transition estimate from the neighbour label consensus of the final probe space (measured closer to
    the true T than the early one's, docs/detection.md), else the early one; with the true T and its error when
    ground truth exists. None when no neighbours were computed."""
    space = next((name for name in ("knn", "knn_early") if f"{name}_counts" in cols), None)
    if space is None:
        return None
    estimate = estimate_from_neighbours(cols["label"], cols[f"{space}_counts"], num_classes, det.min_concentration)
    out = {"space": space, **estimate}
    if "true_label" in cols and "is_corrupted" in cols:
        truth = empirical_transition(cols["true_label"], cols["label"], num_classes)
        out["true"] = truth.tolist()
        out["error"] = transition_error(np.asarray(out["estimate"]), truth)
    return out


def run(
    attribution_uri: str,
    data_uri: str,
    out_uri: str,
    cfg: PartitionConfig,
    det: DetectionConfig,
    seed: int,
    n_rows: int,
    num_classes: int,
    trajectory_uri: str | None,
    executor,
    log=print,
    probe_columns: tuple[str, ...] = ("probe",),
    missing: dict[str, str] | None = None,
    truth_known: bool = True,
) -> dict[str, Any]:
    """`probe_columns`: the probe spaces the attribution shards hold; `missing`: signals that cannot exist for this
    run, and why (e.g. no trajectory for a given model), for the report; `truth_known`: whether the data's ground
    truth columns mean anything (else the detection is not scored)."""
    shards = attribution_shards(attribution_uri)
    # 1. Per-shard signals, in parallel: the attribution mixture (fitted on a uniform sample), kNN votes, FINE.
    mixture = fit(shards, n_rows, cfg, seed, executor)
    spaces = ProbeSpaces.build(shards, list(probe_columns), n_rows, det, num_classes, seed, executor)
    names = [uri.rsplit("/", 1)[-1] for uri in shards]
    jobs = [(uri, storage.join(layout.signals_dir(out_uri), name)) for uri, name in zip(shards, names, strict=True)]
    executor.map(lambda job: signal_shard(job[0], job[1], mixture, spaces, det), jobs, "signals")

    # 2. The decision, on the driver: it reads back a few scalars per sample, never the vectors.
    tables = [storage.read_table(out) for _, out in jobs]
    lengths = [t.num_rows for t in tables]
    cols = columns_from_table(pa.concat_tables(tables))
    transition = transition_estimate(cols, num_classes, det, seed)
    signals = gather_signals(cols, trajectory_uri, transition)
    p_noisy, score, signals_used = decide(signals, cols["label"], num_classes, det, seed, transition)
    signals_used["missing"] = dict(missing or {})
    is_clean = split(p_noisy, cfg.tau)
    check_clean_side(is_clean, cfg)

    # 3. Partition shards aligned with the attribution shards (the prune stage joins them shard by shard).
    out = write_split(out_uri, names, lengths, cols, p_noisy, is_clean, score, signals, cfg.relabel_min_vote_share)
    storage.write_json(layout.mixture_file(out_uri), mixture.describe())
    # 4. The validation split's own detection, by the training split's decision (for choosing a route).
    train, fitted = (signals, cols["label"], is_clean), (mixture, spaces)
    validation = detect_validation(attribution_uri, data_uri, out_uri, train, fitted, det, cfg.tau, seed, truth_known)
    summary: dict[str, Any] = {
        "n_clean": int(is_clean.sum()),
        "n_noisy": int((~is_clean).sum()),
        "tau": cfg.tau,
        "signals_used": signals_used,
        "signals_available": sorted(signals),
        "transition_matrix": transition,
        "relabel": relabel_summary(cols, out["suggested_label"], out["relabelled_to"], ~is_clean, truth_known),
        "validation": validation,
        # the attribution mixture is the split's own decision only for detection.signal=attribution; otherwise
        # its p_noisy is one signal among those the decision read
        "mixture": {**mixture_summary(mixture), "made_the_split": signals_used["signal"] == "attribution"},
    }
    if "is_corrupted" in cols and truth_known:
        summary["detection"] = score_detection(cols["is_corrupted"], p_noisy, score, signals, cfg.tau)
    det_m = summary.get("detection")
    log(
        f"[partition] signal {signals_used['signal']} ({', '.join(signals_used.get('chosen', []) or ['mixture'])}), "
        f"decision {signals_used.get('decision_taken', '-')}: clean {summary['n_clean']}, noisy {summary['n_noisy']}"
        + (f"; detection F1 {det_m['f1']:.3f} AUROC {det_m['auroc']:.3f}" if det_m else "")
    )
    return summary


def mixture_summary(mixture: MixtureFit) -> dict[str, Any]:
    """What the report shows of the attribution mixture's fit."""
    return {k: v for k, v in mixture.describe().items() if k in MIXTURE_SUMMARY}


def score_detection(truth, p_noisy, score, signals: dict[str, np.ndarray], tau: float) -> dict[str, Any]:
    """Precision, recall, F1 of the split, AUROC of p_noisy and of the score it was decided from, and of each
    signal alone (to read what the chosen rule gained). Ground truth is used only to score."""
    out = detection_metrics(truth, p_noisy, tau)
    out["auroc_score"] = detection_metrics(truth, np.asarray(score, dtype=np.float64), 0.5)["auroc"]
    out["auroc_by_signal"] = {
        name: detection_metrics(truth, np.asarray(s, dtype=np.float64), 0.5)["auroc"] for name, s in signals.items()
    }
    return out


def read_partition(partition_uri: str, columns: list[str] | None = None):
    import pyarrow as pa

    cols = columns or ["sample_id", "label", "pred_label", "suggested_label", "p_noisy", "is_clean"]
    tables = []
    for uri in storage.list_files(layout.partition_dir(partition_uri), ".parquet"):
        t = storage.read_table(uri)
        tables.append(t.select([c for c in [*cols, "is_corrupted", "true_label"] if c in t.column_names]))
    return pa.concat_tables(tables)
