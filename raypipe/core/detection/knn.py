"""Neighbour label agreement in the probe space: the reference index and its exact, blocked kNN search.

A mislabelled sample still sits among samples of its true class in the representation, so few of its nearest
neighbours carry its (wrong) given label. Build one `KnnIndex` (the reference set), ship it to every worker and
call `KnnIndex.votes` on each worker's block of query rows.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np
import torch

Metric = Literal["cosine", "euclidean"]
Features = Literal["relu", "raw"]


def _to_torch(a: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """numpy -> torch without a copy on CPU. Arrays from Ray's object store are read-only; nothing here writes
    to them, so torch's 'non-writable array' warning is silenced rather than paying a copy."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a).to(device)


# Memory bound of one block of the kNN search: the [block, R] float32 similarity matrix (plus top-k scratch).
DEFAULT_BLOCK_BYTES = 256 * 2**20


class KnnVotes(NamedTuple):
    """Per query sample: how its k nearest reference neighbours vote on its label.

    agreement:       float32 [Q], weighted share of the neighbours whose label is the query's given label.
    suggested_label: int64 [Q], the label with the largest weighted vote (ties go to the given label, then
                     to the smallest class index): a candidate correction for flagged samples.
    suggested_share: float32 [Q], the weighted vote share of `suggested_label` (>= agreement).
    counts:          int64 [Q, C], how many of the k neighbours carry each label (unweighted; `votes(counts=True)`,
                     else None): the neighbourhood label consensus a noise transition estimate reads.
    """

    agreement: np.ndarray
    suggested_label: np.ndarray
    suggested_share: np.ndarray
    counts: np.ndarray | None = None


def prepare_features(x: np.ndarray, metric: Metric = "cosine", features: Features = "raw") -> np.ndarray:
    """Probe activations [N, d] -> the float32 [N, d] rows the kNN search compares.

    features="raw" (default): h as is, whose negative side still carries class information; "relu": ReLU(h),
    what the head reads. metric="cosine": rows L2-normalized (an all-zero row stays zero: it is equally far from
    everything); "euclidean": rows as they are.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D [N, d] array, got shape {x.shape}")
    if features == "relu":
        x = np.maximum(x, 0.0)
    elif features != "raw":
        raise ValueError(f"features must be 'relu' or 'raw', got {features!r}")
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.maximum(norms, 1e-12)
    elif metric != "euclidean":
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    return np.ascontiguousarray(x, dtype=np.float32)


@dataclass(eq=False)  # numpy fields: a generated __eq__ would be ambiguous
class KnnIndex:
    """The reference set of the neighbour search, prepared once and shipped to every worker (plain numpy, pickles).

    Build with `KnnIndex.build`. Exact search = blocked matmul + top-k: each query block computes its
    similarity to all R reference rows ([block, R] float32), so memory is O(block * R) and the cost
    O(Q * R * d) flops, a matmul (fast on CPU BLAS, faster on a GPU with device="cuda").
    """

    x: np.ndarray  # float32 [R, d], prepared (ReLU / L2 as `features` / `metric` say)
    labels: np.ndarray  # int64 [R], given labels of the reference rows
    num_classes: int
    metric: Metric = "cosine"
    features: Features = "raw"
    ids: np.ndarray | None = None  # int64 [R] sample ids, unique; needed to exclude a query from its own neighbours
    class_prior: np.ndarray | None = None  # float64 [C], the prior used by class_balanced votes
    _sorted_ids: np.ndarray | None = field(default=None, repr=False)  # ids sorted, for searchsorted
    _sorted_pos: np.ndarray | None = field(default=None, repr=False)  # positions of the sorted ids
    _ref_norm2: np.ndarray | None = field(default=None, repr=False)  # float32 [R] |r|^2, euclidean only
    _on_device: dict = field(default_factory=dict, repr=False)  # device -> torch tensors; never pickled

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_on_device"] = {}  # ship numpy only; each worker moves the reference to its own device once
        return state

    def _tensors(self, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(ref [R, d], labels [R], |r|^2 [R] or None) on `device`, cached: one host->device copy per worker."""
        if device not in self._on_device:
            dev = torch.device(device)
            norm2 = None if self._ref_norm2 is None else _to_torch(self._ref_norm2, dev)
            self._on_device[device] = (_to_torch(self.x, dev), _to_torch(self.labels, dev), norm2)
        return self._on_device[device]

    @classmethod
    def build(
        cls,
        ref_x: np.ndarray,
        ref_labels: np.ndarray,
        num_classes: int,
        ref_ids: np.ndarray | None = None,
        metric: Metric = "cosine",
        features: Features = "raw",
        class_prior: np.ndarray | None = None,
    ) -> KnnIndex:
        """Prepare the reference rows: ref_x [R, d] probe activations, ref_labels [R] given labels.

        ref_ids [R]: unique sample ids, needed for `votes(query_ids=...)` to keep a sample out of its own
        neighbours. A caller that searches a subsample of the training set builds the index on that subsample;
        a query whose row is not in the index then simply has nothing to exclude.
        class_prior: the class frequencies that `class_balanced` votes divide by; default = the given-label
        frequencies of the reference rows, i.e. of the pool the neighbours are drawn from.
        """
        ref_x = np.asarray(ref_x)
        ref_labels = np.asarray(ref_labels, dtype=np.int64)
        if ref_x.ndim != 2 or len(ref_x) != len(ref_labels):
            raise ValueError(f"ref_x [R, d] and ref_labels [R] disagree: {ref_x.shape} vs {ref_labels.shape}")
        if len(ref_labels) and (ref_labels.min() < 0 or ref_labels.max() >= num_classes):
            raise ValueError(f"ref_labels must lie in [0, {num_classes})")
        if ref_ids is not None:
            ref_ids = np.asarray(ref_ids, dtype=np.int64)
            if len(ref_ids) != len(ref_labels):
                raise ValueError(f"ref_ids has {len(ref_ids)} rows, ref_labels {len(ref_labels)}")
        x = prepare_features(ref_x, metric, features)
        if class_prior is None:
            class_prior = np.bincount(ref_labels, minlength=num_classes) / max(len(ref_labels), 1)
        class_prior = np.asarray(class_prior, dtype=np.float64)
        if class_prior.shape != (num_classes,):
            raise ValueError(f"class_prior must have shape ({num_classes},), got {class_prior.shape}")
        index = cls(
            x=x,
            labels=ref_labels,
            num_classes=int(num_classes),
            metric=metric,
            features=features,
            ids=ref_ids,
            class_prior=class_prior,
        )
        if ref_ids is not None:
            order = np.argsort(ref_ids, kind="stable")
            index._sorted_ids, index._sorted_pos = ref_ids[order], order
            if len(order) > 1 and np.any(index._sorted_ids[1:] == index._sorted_ids[:-1]):
                raise ValueError("ref_ids must be unique (self-exclusion matches a query to one reference row)")
        if metric == "euclidean":
            index._ref_norm2 = np.einsum("ij,ij->i", x, x)
        return index

    def __len__(self) -> int:
        return len(self.labels)

    def _self_positions(self, query_ids: np.ndarray) -> np.ndarray:
        """int64 [Q]: the reference row holding each query's own id, or -1 where the id is not in the index."""
        if self._sorted_ids is None:
            raise ValueError("self-exclusion needs ref_ids: build the index with ref_ids=...")
        pos = np.searchsorted(self._sorted_ids, query_ids)
        pos_c = np.minimum(pos, len(self._sorted_ids) - 1)
        hit = (pos < len(self._sorted_ids)) & (self._sorted_ids[pos_c] == query_ids)
        return np.where(hit, self._sorted_pos[pos_c], -1)

    def votes(
        self,
        query_x: np.ndarray,
        query_labels: np.ndarray,
        k: int,
        query_ids: np.ndarray | None = None,
        class_balanced: bool = False,
        block_size: int | None = None,
        device: str = "cpu",
        counts: bool = False,
    ) -> KnnVotes:
        """How the k nearest reference neighbours of each query row vote on its given label (exact, blocked).

        query_x [Q, d], query_labels [Q]: the samples to score (one block of the training set, or all of it).
        query_ids [Q]: a query is never its own neighbour (matched by id against the index's ref_ids, so the
            query block may be any slice of the reference set). Without it, querying the reference set against
            itself counts each sample's own label as one of its k votes.
        class_balanced: each neighbour j votes with weight 1 / prior(y_j) (the index's class_prior): the vote
            estimates the class posterior under a uniform prior, so a small class is not outvoted for being small.
        block_size: queries per block; memory O(block_size * R). None = a 256 MiB similarity block.
        device: torch device of the matmul ("cuda" where a GPU is free).
        counts: also return the neighbours' unweighted label counts [Q, C].

        Ties at the k-th distance are broken by torch.topk (deterministic for the same input); similarities are
        float32, so only near-duplicates tie. Self-exclusion is by id, never by distance.
        """
        query_labels = np.asarray(query_labels, dtype=np.int64)
        q = prepare_features(query_x, self.metric, self.features)  # [Q, d]
        n_q, n_r, c = len(q), len(self), self.num_classes
        if len(query_labels) != n_q:
            raise ValueError(f"query_x has {n_q} rows, query_labels {len(query_labels)}")
        if n_q and (query_labels.min() < 0 or query_labels.max() >= c):
            raise ValueError(f"query_labels must lie in [0, {c})")
        if q.shape[1] != self.x.shape[1]:
            raise ValueError(f"query width {q.shape[1]} != reference width {self.x.shape[1]}")
        self_pos = None
        if query_ids is not None:
            self_pos = self._self_positions(np.asarray(query_ids, dtype=np.int64))  # [Q]
        k_max = n_r - (1 if self_pos is not None and np.any(self_pos >= 0) else 0)
        if not 1 <= k <= k_max:
            raise ValueError(f"k={k} must be in [1, {k_max}] for {n_r} reference rows (minus the query itself)")
        if block_size is None:
            block_size = max(1, DEFAULT_BLOCK_BYTES // (4 * max(n_r, 1)))
        # Class weights of a neighbour's vote: 1, or 1 / prior(its label) normalized to mean 1 over present classes.
        if class_balanced:
            prior = self.class_prior
            w = np.where(prior > 0, 1.0 / np.maximum(prior, 1e-300), 0.0)
            w = w / w[w > 0].mean()
        else:
            w = np.ones(c)

        label_counts = self._neighbour_counts(q, k, self_pos, block_size, device)  # [Q, C]
        weighted = label_counts * w  # [Q, C] float64; counts * weight is exact and order-free, so ties are reproducible
        shares = weighted / np.maximum(weighted.sum(axis=1, keepdims=True), 1e-300)  # [Q, C]
        rows = np.arange(n_q)
        agreement = shares[rows, query_labels]
        suggested = shares.argmax(axis=1)
        best = shares[rows, suggested]
        suggested = np.where(agreement >= best, query_labels, suggested)  # a tie keeps the given label
        return KnnVotes(
            agreement=agreement.astype(np.float32),
            suggested_label=suggested.astype(np.int64),
            suggested_share=shares[rows, suggested].astype(np.float32),
            counts=label_counts if counts else None,
        )

    def _neighbour_counts(
        self, q: np.ndarray, k: int, self_pos: np.ndarray | None, block_size: int, device: str
    ) -> np.ndarray:
        """int64 [Q, C]: how many of each prepared query row's k nearest reference rows carry each label."""
        n_q, c = len(q), self.num_classes
        dev = torch.device(device)
        ref, ref_labels, ref_norm2 = self._tensors(device)  # [R, d], [R], [R] or None
        counts = np.empty((n_q, c), dtype=np.int64)  # neighbours per class, exact integers
        for start in range(0, n_q, block_size):
            stop = min(start + block_size, n_q)
            qb = _to_torch(q[start:stop], dev)  # [b, d]
            sim = qb @ ref.T  # [b, R]: cosine similarity (rows are unit) or q.r
            if ref_norm2 is not None:  # euclidean: -|q - r|^2 = 2 q.r - |r|^2 - |q|^2; |q|^2 is constant per row
                sim = 2.0 * sim - ref_norm2
            if self_pos is not None:
                sp = _to_torch(self_pos[start:stop], dev)  # [b]
                rows = torch.nonzero(sp >= 0).squeeze(1)
                sim[rows, sp[rows]] = -math.inf  # a sample is never its own neighbour
            nn_idx = torch.topk(sim, k, dim=1, largest=True, sorted=False).indices  # [b, k]
            nn_lab = ref_labels[nn_idx]  # [b, k]
            cnt = torch.zeros((stop - start, c), dtype=torch.int64, device=dev)
            cnt.scatter_add_(1, nn_lab, torch.ones_like(nn_lab))  # [b, C]
            counts[start:stop] = cnt.cpu().numpy()
        return counts
