"""Per-class principal-direction alignment in a representation (FINE, Kim et al. NeurIPS 2021).

The samples of one class span, in a trained representation, mostly one direction: the top eigenvector u_c of
the second-moment matrix of the class's (L2-normalized) features. A sample whose given label is wrong belongs to
another class's direction, so its alignment (u_{y_i} . z_i)^2 with its given class's direction is low.
Suspicion = 1 - alignment. The per-class sums (`ClassGram`) are computed where the data is, shard by shard, and
merged; only [C, d, d] sums travel.
"""

from __future__ import annotations

import numpy as np

from raypipe.core.detection.knn import Features, prepare_features


class ClassGram:
    """Per given class: the sum of z z^T over its samples' normalized features z, and their count."""

    def __init__(self, num_classes: int, width: int):
        self.num_classes, self.width = int(num_classes), int(width)
        self.gram = np.zeros((self.num_classes, self.width, self.width))  # float64 [C, d, d]
        self.count = np.zeros(self.num_classes, dtype=np.int64)  # [C]

    def update(self, h: np.ndarray, labels: np.ndarray, features: Features = "raw") -> ClassGram:
        """Add rows h [B, d] (probe activations) with given labels [B]; returns self."""
        z = prepare_features(h, "cosine", features).astype(np.float64)  # [B, d], unit rows
        labels = np.asarray(labels, dtype=np.int64)
        if z.shape[1] != self.width or len(labels) != len(z):
            raise ValueError(f"expected h [B, {self.width}] and labels [B], got {z.shape} and {labels.shape}")
        for c in np.unique(labels):
            rows = z[labels == c]
            self.gram[c] += rows.T @ rows
            self.count[c] += len(rows)
        return self

    def merge(self, other: ClassGram) -> ClassGram:
        if (other.num_classes, other.width) != (self.num_classes, self.width):
            raise ValueError("ClassGram of different shapes")
        self.gram += other.gram
        self.count += other.count
        return self

    def to_dict(self) -> dict[str, np.ndarray]:
        return {"gram": self.gram, "count": self.count}

    @classmethod
    def from_dict(cls, d: dict[str, np.ndarray]) -> ClassGram:
        gram = np.asarray(d["gram"], dtype=np.float64)
        out = cls(gram.shape[0], gram.shape[1])
        out.gram, out.count = gram.copy(), np.asarray(d["count"], dtype=np.int64).copy()
        return out

    def directions(self) -> np.ndarray:
        """float64 [C, d]: each class's top eigenvector (unit; zero for a class without samples)."""
        out = np.zeros((self.num_classes, self.width))
        for c in range(self.num_classes):
            if self.count[c]:
                _, vectors = np.linalg.eigh(self.gram[c])  # ascending eigenvalues
                out[c] = vectors[:, -1]
        return out


def alignment(h: np.ndarray, labels: np.ndarray, directions: np.ndarray, features: Features = "raw") -> np.ndarray:
    """float32 [N] in [0, 1]: (u_{y_i} . z_i)^2, the squared cosine between each sample's features h [N, d] and its
    given class's direction (`ClassGram.directions`); the sign of an eigenvector does not matter."""
    z = prepare_features(h, "cosine", features)
    labels = np.asarray(labels, dtype=np.int64)
    u = np.asarray(directions, dtype=np.float32)[labels]  # [N, d]
    return np.einsum("nd,nd->n", z, u).astype(np.float32) ** 2
