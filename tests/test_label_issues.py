"""The label issues table follows cleanlab's conventions (the shape of `Datalab.get_issues("label")`): checked on a
tiny planted example against cleanlab's own functions (a test-only dependency; the package never imports it)."""

from __future__ import annotations

import numpy as np
import pytest

from raypipe.core.detection.issues import best_other_class, label_issues_table, label_score, suggest_labels

N, C = 60, 3
PLANTED = np.array([2, 11, 23, 37, 50])


def _planted():
    rng = np.random.default_rng(0)
    true = np.arange(N) % C
    given = true.copy()
    given[PLANTED] = (true[PLANTED] + 1) % C
    probs = rng.uniform(0.0, 0.1, (N, C))
    probs[np.arange(N), true] += rng.uniform(0.6, 0.9, N)
    probs /= probs.sum(axis=1, keepdims=True)
    return true, given, probs


def test_ranks_and_flags_like_cleanlab():
    filt = pytest.importorskip("cleanlab.filter")
    rank = pytest.importorskip("cleanlab.rank")
    true, given, probs = _planted()
    self_confidence = probs[np.arange(N), given]
    theirs = rank.get_label_quality_scores(given, probs, method="self_confidence")  # higher = cleaner
    flagged = filt.find_label_issues(given, probs)
    ranked = filt.find_label_issues(given, probs, return_indices_ranked_by="self_confidence")
    assert set(np.flatnonzero(flagged)) == set(PLANTED)  # the example is easy: cleanlab finds exactly the planted
    table = label_issues_table(
        sample_id=np.arange(N) + 1000,
        given=given,
        predicted=probs.argmax(1),
        is_issue=flagged,
        p_noisy=flagged.astype(np.float32),  # saturated: 0 or 1
        score=1.0 - self_confidence,
        signals={"loss": -np.log(self_confidence)},
        candidates=[probs.argmax(1)],
    )
    assert len(table["sample_id"]) == N  # every row, not only the flagged
    order = table["sample_id"] - 1000
    np.testing.assert_array_equal(order[: len(ranked)], ranked)  # flagged first, in cleanlab's ranked order
    assert table["is_label_issue"].dtype == bool and table["is_label_issue"][: len(ranked)].all()
    assert not table["is_label_issue"][len(ranked) :].any()
    # label_score: higher = cleaner, in [0, 1], the same order as cleanlab's, no ties
    ours = table["label_score"]
    assert ours.min() == 0.0 and ours.max() == 1.0 and len(np.unique(ours)) == N
    np.testing.assert_array_equal(np.argsort(ours[np.argsort(order)]), np.argsort(theirs))
    np.testing.assert_array_equal(table["given_label"], given[order])
    np.testing.assert_array_equal(table["predicted_label"], probs.argmax(1)[order])  # Datalab's predicted_label
    k = len(ranked)
    np.testing.assert_array_equal(table["suggested_label"][:k], true[order[:k]])  # the planted rows' true labels
    np.testing.assert_array_equal(table["score_loss"], -np.log(self_confidence[order]).astype(np.float32))


def test_a_saturated_score_is_ranked_by_its_tie_break_not_by_position():
    score = np.array([1.0, 1.0, 1.0, 0.2, 0.0])  # three rows saturated at 1
    loss = np.array([0.5, 3.0, 1.0, 0.1, 0.0])
    q = label_score(score, loss)
    np.testing.assert_array_equal(np.argsort(q), [1, 2, 0, 3, 4])  # most suspect first: by loss among the ties
    assert len(np.unique(q)) == 5 and q[1] == 0.0 and q[4] == 1.0
    assert label_score(np.array([0.3]))[0] == 0.0


def test_a_flagged_row_is_never_suggested_its_given_label():
    given = np.array([0, 1, 2, 0, 1])
    flagged = np.array([True, True, True, True, False])
    knn = np.array([0, 2, 2, 1, 1])  # rows 0 and 2 would keep their label
    model = np.array([1, 1, 2, 2, 1])  # row 2 again
    other = np.array([2, 0, 0, 2, 0])
    got = suggest_labels(given, flagged, [knn, model, other])
    np.testing.assert_array_equal(got, [1, 2, 0, 1, 1])  # row 4 is not flagged: the first candidate, its given label
    assert suggest_labels(np.array([1]), np.array([True]), [np.array([1])])[0] == -1  # no other candidate


def test_best_other_class_skips_the_given_label():
    counts = np.array([[5.0, 3.0, 1.0], [0.0, 0.0, 4.0], [2.0, 2.0, 0.0]])
    np.testing.assert_array_equal(best_other_class(counts, np.array([0, 2, 1])), [1, 0, 0])
