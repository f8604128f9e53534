"""The training split's clean / noisy decision carried over to other samples (the validation split).

The partition decides on the training split from signals some of which exist only there (the training
trajectory). To detect the wrong labels of the validation split the same way, without refitting anything on
it, a logistic regression is fitted on the training split: from the signals both splits have (standardized
with the training split's mean and spread) and the given class (one indicator per class, so each class keeps
its own baseline, as the per-class decision does), to the training split's decision. Applied to the
validation split's signals it gives their `p_noisy`.

Arrays in, arrays out: no Ray, no file I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression


@dataclass(frozen=True)
class DecisionTransfer:
    """The fitted map from (signals, given class) to p_noisy. `constant`: the decision every training row got
    when they all got the same one (nothing to fit), else None."""

    names: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    num_classes: int
    model: LogisticRegression | None
    constant: float | None = None

    def features(self, signals: dict[str, np.ndarray], labels: np.ndarray) -> np.ndarray:
        x = np.stack([np.asarray(signals[n], dtype=np.float64) for n in self.names], axis=1)
        x = (x - self.mean) / self.scale
        onehot = np.eye(self.num_classes)[np.asarray(labels, dtype=np.int64)]
        return np.concatenate([x, onehot], axis=1)

    def p_noisy(self, signals: dict[str, np.ndarray], labels: np.ndarray) -> np.ndarray:
        """float32 [M]: p_noisy of other samples from their signals (the names this was fitted on) and given labels."""
        if self.constant is not None or self.model is None:
            return np.full(len(labels), self.constant or 0.0, dtype=np.float32)
        return self.model.predict_proba(self.features(signals, labels))[:, 1].astype(np.float32)


def fit_transfer(
    signals: dict[str, np.ndarray], labels: np.ndarray, is_noisy: np.ndarray, num_classes: int, seed: int = 0
) -> DecisionTransfer:
    """Fit the training split's decision `is_noisy` [N] from `signals` (name -> [N], the ones both splits have)
    and the given `labels` [N]."""
    names = tuple(sorted(signals))
    is_noisy = np.asarray(is_noisy, dtype=bool)
    x = np.stack([np.asarray(signals[n], dtype=np.float64) for n in names], axis=1)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    if is_noisy.all() or not is_noisy.any():
        return DecisionTransfer(names, mean, scale, num_classes, None, float(is_noisy.all()))
    transfer = DecisionTransfer(names, mean, scale, num_classes, None)
    model = LogisticRegression(C=1.0, max_iter=1000, random_state=seed)
    model.fit(transfer.features(signals, labels), is_noisy.astype(np.int64))
    return DecisionTransfer(names, mean, scale, num_classes, model)
