"""Scores: a classifier on labelled samples, and a detector of corrupted samples against ground truth.
numpy / scikit-learn, no Ray. Ground truth, where an experiment has it, is only ever used here."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support, precision_score, roc_auc_score


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_precision": float(precision_score(y_true, y_pred, average="macro", zero_division=0)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }


def detection_metrics(is_corrupted: np.ndarray, p_noisy: np.ndarray, tau: float) -> dict[str, float]:
    """Score the split `p_noisy >= tau` (flagged) against ground truth: the positive class is 'corrupted'."""
    truth = np.asarray(is_corrupted, dtype=bool)
    flagged = np.asarray(p_noisy) >= tau
    precision, recall, f1, _ = precision_recall_fscore_support(
        truth, flagged, average="binary", pos_label=True, zero_division=0
    )
    auroc = float(roc_auc_score(truth, p_noisy)) if 0 < truth.sum() < len(truth) else float("nan")
    return {
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "auroc": auroc,
        "n_flagged": int(flagged.sum()),
        "n_corrupted": int(truth.sum()),
    }
