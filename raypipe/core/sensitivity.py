"""Sensitivity regression: which probe neurons track the noisy samples. numpy, no Ray.

Least squares with intercept of y (the noisy indicator, or p_noisy) on the probe activations
X = h(x) [N, d], solved from sufficient statistics: n, sum(x) [d], sum(y), X^T X [d, d], X^T y [d].
Blocks of rows update their own accumulator anywhere (a Ray task, a shard); the driver merges
them, so its memory is O(d^2) whatever N is. (The published notebooks regressed on the class label
by mistake; here y is the real per-sample target.)
"""

from __future__ import annotations

import numpy as np


class SufficientStats:
    def __init__(self, width: int):
        self.width = width
        self.n = 0
        self.sum_x = np.zeros(width)  # [d]
        self.sum_y = 0.0
        self.xtx = np.zeros((width, width))  # [d, d]
        self.xty = np.zeros(width)  # [d]

    def update(self, x: np.ndarray, y: np.ndarray) -> SufficientStats:
        """Add a block: x [B, d], y [B]. float64 sums, so block order does not matter."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        if x.ndim != 2 or x.shape[1] != self.width or x.shape[0] != y.shape[0]:
            raise ValueError(f"expected x [B, {self.width}] and y [B], got {x.shape} and {y.shape}")
        self.n += x.shape[0]
        self.sum_x += x.sum(axis=0)
        self.sum_y += float(y.sum())
        self.xtx += x.T @ x
        self.xty += x.T @ y
        return self

    def merge(self, other: SufficientStats) -> SufficientStats:
        if other.width != self.width:
            raise ValueError(f"cannot merge statistics of width {other.width} into width {self.width}")
        self.n += other.n
        self.sum_x += other.sum_x
        self.sum_y += other.sum_y
        self.xtx += other.xtx
        self.xty += other.xty
        return self

    def solve(self) -> tuple[np.ndarray, float]:
        """-> (beta [d], intercept). Centred normal equations; minimum-norm solution when rank
        deficient (constant columns such as pruned neurons get beta 0), as scikit-learn does."""
        if self.n < 2:
            raise ValueError("need at least 2 samples to fit the sensitivity regression")
        mean_x = self.sum_x / self.n
        mean_y = self.sum_y / self.n
        sxx = self.xtx - self.n * np.outer(mean_x, mean_x)
        sxy = self.xty - self.n * mean_x * mean_y
        beta = np.linalg.lstsq(sxx, sxy, rcond=None)[0]
        return beta, float(mean_y - mean_x @ beta)

    def to_dict(self) -> dict[str, np.ndarray]:
        return {
            "n": np.array([self.n]),
            "sum_x": self.sum_x,
            "sum_y": np.array([self.sum_y]),
            "xtx": self.xtx,
            "xty": self.xty,
        }

    @classmethod
    def from_dict(cls, d: dict[str, np.ndarray]) -> SufficientStats:
        stats = cls(len(d["sum_x"]))
        stats.n = int(np.asarray(d["n"]).reshape(-1)[0])
        stats.sum_x = np.asarray(d["sum_x"], dtype=np.float64)
        stats.sum_y = float(np.asarray(d["sum_y"]).reshape(-1)[0])
        stats.xtx = np.asarray(d["xtx"], dtype=np.float64)
        stats.xty = np.asarray(d["xty"], dtype=np.float64)
        return stats


def rank_neurons(beta: np.ndarray, n_prune: int, already_pruned: np.ndarray | None = None) -> np.ndarray:
    """Indices of the `n_prune` neurons with the largest |beta|, most sensitive first, skipping
    neurons already pruned."""
    score = np.abs(np.asarray(beta, dtype=np.float64))
    if already_pruned is not None:
        score = np.where(already_pruned, -np.inf, score)
    order = np.argsort(-score, kind="stable")
    n_alive = int(np.isfinite(score).sum())
    return order[: min(n_prune, n_alive)]
