"""Which flagged samples get a new label (the relabel route), and how right the suggested labels are.

A flagged sample is relabelled only when its suggestions are confident: every suggestion source (the
neighbours' majority in each probe space: the final model's and the early model's) names the same class,
that class is not the given label, and in every space at least `min_vote_share` of the neighbours' votes
went to it. Any other flagged sample is left out of the relabel route's training set.

Arrays in, arrays out: no Ray, no file I/O.
"""

from __future__ import annotations

import numpy as np

NOT_RELABELLED = -1


def confident_relabels(
    given: np.ndarray,
    flagged: np.ndarray,
    suggestions: list[np.ndarray],
    vote_shares: list[np.ndarray],
    min_vote_share: float,
) -> np.ndarray:
    """int64 [N]: the new label of each relabelled row, `NOT_RELABELLED` (-1) for every other row.

    `suggestions`: one int array [N] per source (e.g. the kNN majority of each probe space); `vote_shares`: per
    source, float [N, C] of the neighbours' vote shares (rows sum to 1). With no source, nothing is relabelled."""
    given = np.asarray(given, dtype=np.int64)
    out = np.full(len(given), NOT_RELABELLED, dtype=np.int64)
    if not suggestions:
        return out
    first = np.asarray(suggestions[0], dtype=np.int64)
    take = np.asarray(flagged, dtype=bool) & (first != given) & (first >= 0)
    rows = np.arange(len(given))
    for suggestion, shares in zip(suggestions, vote_shares, strict=True):
        take &= np.asarray(suggestion, dtype=np.int64) == first
        take &= np.asarray(shares, dtype=np.float64)[rows, np.clip(first, 0, None)] >= min_vote_share
    out[take] = first[take]
    return out


def vote_shares(counts: np.ndarray) -> np.ndarray:
    """float64 [N, C]: neighbour vote counts [N, C] as shares of each row's votes (a row without votes: zeros)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)


def suggestion_accuracy(
    suggested: np.ndarray, relabelled_to: np.ndarray, flagged: np.ndarray, true_label: np.ndarray, corrupted
) -> dict[str, float | int]:
    """How right the suggested labels are against the ground truth (for scoring only): on the flagged rows, on the
    flagged rows that were truly corrupted, and on the relabelled rows (their new label). NaN where a set is empty."""
    suggested, relabelled_to = np.asarray(suggested), np.asarray(relabelled_to)
    true_label, flagged = np.asarray(true_label), np.asarray(flagged, dtype=bool)
    corrupted = np.asarray(corrupted, dtype=bool)
    relabelled = relabelled_to != NOT_RELABELLED

    def share(mask: np.ndarray, labels: np.ndarray) -> float:
        return float((labels[mask] == true_label[mask]).mean()) if mask.any() else float("nan")

    return {
        "n_flagged": int(flagged.sum()),
        "suggested_accuracy_flagged": share(flagged, suggested),
        "suggested_accuracy_flagged_corrupted": share(flagged & corrupted, suggested),
        "n_relabelled": int(relabelled.sum()),
        "relabel_accuracy": share(relabelled, relabelled_to),
    }
