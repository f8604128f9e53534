"""The partition stage's second half: the validation split's own detection, and the relabel route's labels.

- `detect_validation`: the validation split went through the attribution pass with the training split
  (`raypipe.layout.val_attribution_file`); here it gets the same per-sample signals against the training
  split's fitted mixture, kNN references and class directions (`signal_shard`), and the training split's
  decision carried over by `raypipe.core.detection.transfer` (fitted on the training split only, never on the
  validation split). Its output: ``val/`` (sample_id, label, p_noisy, is_clean, the signals) and
  ``val_cleaned/`` (the validation samples detected as clean, in the data's sample-table format), on which
  every route is scored to recommend one without the test split (`raypipe.report.choice`).
- `relabels`: which flagged training samples the relabel route takes, and with which label.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raypipe import layout, storage
from raypipe.core.detection.relabel import confident_relabels, suggestion_accuracy, vote_shares
from raypipe.core.detection.transfer import fit_transfer
from raypipe.core.metrics import detection_metrics
from raypipe.core.mixture import split
from raypipe.stages.signals import ProbeSpaces, gather_signals, signal_shard
from raypipe.tables import columns_from_table, keep_ids, table_from_columns

# Signals carried over to the validation split: each compares a sample's probe activations with the training
# split's references (neighbours' labels, class directions), for a training and a validation sample alike. The
# loss and the attribution mixture are left out while any of these exist: a model that memorized its training
# labels has a near-zero loss on every training sample, right label or wrong, but not on a validation sample.
TRANSFER_SIGNALS = ("knn", "knn_early", "fine")
FALLBACK_SIGNALS = ("attribution", "loss")
KNN_SPACES = ("knn", "knn_early")


def relabels(cols: dict[str, np.ndarray], flagged: np.ndarray, min_vote_share: float) -> np.ndarray:
    """int64 [N]: the new label of each flagged training sample whose probe spaces' neighbour majorities agree
    on another class with at least `min_vote_share` of the votes each; -1 for every other sample."""
    spaces = [s for s in KNN_SPACES if f"{s}_suggested" in cols]
    return confident_relabels(
        cols["label"],
        flagged,
        [cols[f"{s}_suggested"] for s in spaces],
        [vote_shares(cols[f"{s}_counts"]) for s in spaces],
        min_vote_share,
    )


def relabel_summary(cols, suggested, relabelled_to, flagged, truth_known: bool) -> dict[str, Any]:
    """How many samples were relabelled and, when the ground truth is known, how right the suggested labels are."""
    if truth_known and "true_label" in cols and "is_corrupted" in cols:
        return suggestion_accuracy(suggested, relabelled_to, flagged, cols["true_label"], cols["is_corrupted"])
    return {"n_flagged": int(np.sum(flagged)), "n_relabelled": int(np.sum(relabelled_to >= 0))}


def detect_validation(
    attribution_uri: str,
    data_uri: str,
    out_uri: str,
    train: tuple[dict[str, np.ndarray], np.ndarray, np.ndarray],
    fitted: tuple[Any, ProbeSpaces],
    det,
    tau: float,
    seed: int,
    truth_known: bool,
) -> dict[str, Any] | None:
    """`train`: (the training split's signals, given labels, is_clean); `fitted`: (the attribution mixture, the
    probe spaces) -> the summary of the validation split's detection (scored when `truth_known`);
    None when it has no attribution (no validation split, or an attribution stage from before this existed)."""
    val_attribution = layout.val_attribution_file(attribution_uri)
    if not storage.exists(val_attribution):
        return None
    out = layout.val_detection_file(out_uri)
    signal_shard(val_attribution, out, *fitted, det)
    cols = columns_from_table(storage.read_table(out))
    val_signals = gather_signals(cols, None)
    train_signals, train_labels, train_clean = train
    names = [n for n in TRANSFER_SIGNALS if n in train_signals and n in val_signals]
    names = names or [n for n in FALLBACK_SIGNALS if n in train_signals and n in val_signals]
    num_classes = int(max(train_labels.max(), cols["label"].max())) + 1
    transfer = fit_transfer({n: train_signals[n] for n in names}, train_labels, ~train_clean, num_classes, seed)
    cols["p_noisy"] = transfer.p_noisy({n: val_signals[n] for n in names}, cols["label"])
    cols["is_clean"] = split(cols["p_noisy"], tau)
    storage.write_table(out, table_from_columns(cols))
    clean_ids = cols["sample_id"][cols["is_clean"]]
    table = storage.read_table(layout.split_file(data_uri, "val"))
    storage.write_table(layout.cleaned_val_file(out_uri), keep_ids(table, clean_ids))
    summary: dict[str, Any] = {"n": len(cols["sample_id"]), "n_clean": len(clean_ids), "signals": names}
    if truth_known and "is_corrupted" in cols:
        summary["detection"] = detection_metrics(cols["is_corrupted"], cols["p_noisy"], tau)
    return summary
