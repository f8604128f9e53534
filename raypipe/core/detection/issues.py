"""The label issues table: one row per training sample, in the shape of cleanlab's ``Datalab.get_issues("label")``.

Columns, most suspect first (the flagged rows, then the rest, each by `label_score`):

- ``is_label_issue`` (bool): flagged by the partition's decision (p_noisy > tau);
- ``label_score`` (float in [0, 1], higher = cleaner, as in cleanlab): the share of training rows that look
  more suspect than this one by the detection score, ties in the score broken by the loss and then the row's
  position. It is a rank, so a saturated posterior (many rows at p_noisy = 1) never ties rows;
- ``given_label``, ``predicted_label`` (the model's own argmax), ``suggested_label``: the first of the candidate
  labels (the neighbours' majority, the model's prediction, ...) that is not the given label for a flagged row
  (for a row not flagged, the first candidate, which may be its given label);
- ``p_noisy`` and ``score_<signal>`` for each detection signal (higher = more suspect), plus ``sample_id`` and
  any extra columns (the ground truth, when the data has it, for scoring only).

Arrays in, arrays out: no Ray, no file I/O.
"""

from __future__ import annotations

import numpy as np


def label_score(score: np.ndarray, tie_break: np.ndarray | None = None) -> np.ndarray:
    """float64 [N] in [0, 1], higher = cleaner: the rank of each row by suspicion (`score`, higher = more suspect;
    ties broken by `tie_break`, higher = more suspect, then by position), scaled so the most suspect row is 0 and
    the cleanest 1. Every value is distinct."""
    score = np.asarray(score, dtype=np.float64)
    n = len(score)
    if n == 0:
        return np.zeros(0)
    tie = np.zeros(n) if tie_break is None else np.asarray(tie_break, dtype=np.float64)
    most_suspect_first = np.lexsort((np.arange(n), -tie, -score))
    out = np.empty(n)
    out[most_suspect_first] = np.arange(n) / max(n - 1, 1)
    return out


def suggest_labels(given: np.ndarray, is_issue: np.ndarray, candidates: list[np.ndarray]) -> np.ndarray:
    """int64 [N]: per row, the first candidate label that differs from the given one when the row is flagged
    (the first candidate otherwise). A flagged row whose candidates all equal its given label gets -1."""
    given = np.asarray(given, dtype=np.int64)
    out = np.asarray(candidates[0], dtype=np.int64).copy()
    todo = np.asarray(is_issue, dtype=bool) & (out == given)
    for candidate in candidates[1:]:
        candidate = np.asarray(candidate, dtype=np.int64)
        take = todo & (candidate != given)
        out[take] = candidate[take]
        todo &= ~take
    out[todo] = -1
    return out


def best_other_class(counts: np.ndarray, given: np.ndarray) -> np.ndarray:
    """int64 [N]: the class with the most votes in `counts` [N, C] besides the given one (ties: the lowest class)."""
    counts = np.asarray(counts, dtype=np.float64).copy()
    counts[np.arange(len(counts)), np.asarray(given, dtype=np.int64)] = -np.inf
    return counts.argmax(axis=1).astype(np.int64)


def label_issues_table(
    sample_id: np.ndarray,
    given: np.ndarray,
    predicted: np.ndarray,
    is_issue: np.ndarray,
    p_noisy: np.ndarray,
    score: np.ndarray,
    signals: dict[str, np.ndarray],
    candidates: list[np.ndarray],
    tie_break: np.ndarray | None = None,
    extra: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """The columns of the label issues table (see the module docstring), every row, most suspect first."""
    is_issue = np.asarray(is_issue, dtype=bool)
    quality = label_score(score, tie_break)
    columns = {
        "sample_id": np.asarray(sample_id, dtype=np.int64),
        "is_label_issue": is_issue,
        "label_score": quality,
        "given_label": np.asarray(given, dtype=np.int64),
        "predicted_label": np.asarray(predicted, dtype=np.int64),
        "suggested_label": suggest_labels(given, is_issue, candidates),
        "p_noisy": np.asarray(p_noisy, dtype=np.float32),
        "score": np.asarray(score, dtype=np.float32),
        **{f"score_{name}": np.asarray(s, dtype=np.float32) for name, s in sorted(signals.items())},
        **(extra or {}),
    }
    order = np.lexsort((quality, ~is_issue))  # flagged first, each group most suspect first
    return {name: values[order] for name, values in columns.items()}
