"""The route to recommend, chosen without the test split: the one most accurate on the validation split against
its given labels (ties: the first in the order given, i.e. the cheaper route first).

Why the given, noisy labels rank routes rightly: when a label's noise depends on its true class only and every
true class keeps its own label more often than it gives any other (T[y, y] > T[y, j], the condition under which
labels can be learnt at all), a prediction moved from a wrong class to the true one gains T[y, y] - T[y, j] > 0 of
expected noisy accuracy, and a move away loses as much (a move between two wrong classes can shift it too, under
class-dependent noise); under symmetric noise noisy accuracy is an increasing affine function of clean accuracy.
No detector decides which samples count, so nothing favours the route that agrees with the detector.

Under class-dependent noise the ranking holds per sample but the weights differ: a mistake on a true class that
keeps only T[y, y] of its labels costs T[y, y] - T[y, j] of noisy accuracy, one on a class that keeps all of them
costs 1, so two routes that trade mistakes between such classes can swap places. `noise_corrected_accuracy` undoes
that given the transition matrix; with the matrix estimated from the data it is only as good as the estimate, which
is poorest under class pairs, where it would matter (docs/departures.md, section 12), so it is a rule that
bench/matched_budget.py measures, not the product's.

Arrays in, arrays out: no Ray, no file I/O.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Above this condition number the estimated T is too close to singular for its inverse to mean anything.
MAX_TRANSITION_CONDITION = 1e3


def noise_corrected_accuracy(predicted: np.ndarray, given: np.ndarray, transition: np.ndarray) -> float:
    """Accuracy against the true labels, estimated from predictions and given labels alone.

    transition [C, C]: T[i, j] = P(given j | true i) (an estimate). When the noise depends on the true class only,
    not on the sample, P(pred a, given j) = sum_i P(pred a, true i) T[i, j]: the joint [C, C] of predictions and
    given labels is the true joint times T, so true joint = joint @ inv(T) and accuracy = its trace. Unbiased for
    the true T; NaN when T is near singular (condition number above MAX_TRANSITION_CONDITION) or no samples."""
    t = np.asarray(transition, dtype=np.float64)
    predicted, given = np.asarray(predicted, dtype=np.int64), np.asarray(given, dtype=np.int64)
    c = t.shape[0]
    if len(given) == 0 or t.shape != (c, c) or np.linalg.cond(t) > MAX_TRANSITION_CONDITION:
        return float("nan")
    joint = np.zeros((c, c))
    np.add.at(joint, (predicted, given), 1.0)
    joint /= len(given)
    true_joint = np.linalg.solve(t.T, joint.T).T  # joint @ inv(T), [pred, true]
    return float(np.trace(true_joint))


# How a route's validation score is read: rule -> (score key, sample-count key, what the score is).
RULES = {
    "given": ("accuracy", "n", "validation samples (their given labels)"),
    "corrected": ("accuracy_corrected", "n", "validation samples (given labels, corrected by the estimated noise)"),
    "cleaned": ("accuracy_cleaned", "n_cleaned", "validation samples detection judged clean"),
}
CHOICE_RULE = "given"  # the product's rule (bench/matched_budget.py measures the others beside it)


def recommend_route(scores: dict[str, dict[str, Any]], rule: str = CHOICE_RULE) -> dict[str, Any]:
    """`scores`: route -> {"accuracy": on the validation split (given labels), "n": how many, ...} (the keys `rule`
    reads, `RULES`), in order of preference on a tie -> {"route", "rule", "accuracy", "n", "why"}; route None when
    no route has a score."""
    key, n_key, what = RULES[rule]
    scored = {
        r: {"accuracy": s[key], "n": s.get(n_key, 0)}
        for r, s in scores.items()
        if s.get(n_key, 0) > 0 and key in s and s[key] == s[key]
    }
    if not scored:
        return {"route": None, "rule": rule, "why": "no validation split (data.val_fraction=0) or no route to score"}
    best = max(scored, key=lambda r: (scored[r]["accuracy"], -list(scored).index(r)))
    top = scored[best]["accuracy"]
    tied = [r for r, s in scored.items() if r != best and s["accuracy"] == top]
    runner_up = max((s["accuracy"] for r, s in scored.items() if r != best), default=None)
    if tied:
        margin = f", tied with {', '.join(tied)}: the first listed (the cheaper) is taken"
    else:
        margin = "" if runner_up is None else f", {top - runner_up:+.4f} over the next route"
    why = (
        f"highest accuracy on the {scored[best]['n']} {what} "
        f"({scored[best]['accuracy']:.4f}{margin}); the test split was not read"
    )
    return {"route": best, "rule": rule, "accuracy": top, "n": scored[best]["n"], "why": why}
