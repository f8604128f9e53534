"""The route to recommend, chosen without the test split: the one most accurate on the validation split against
its given labels (ties: the first in the order given, i.e. the cheaper route first).

Why the given, noisy labels rank routes rightly: when a label's noise depends on its true class only and every
true class keeps its own label more often than it gives any other (T[y, y] > T[y, j], the condition under which
labels can be learnt at all), a prediction moved from a wrong class to the true one gains T[y, y] - T[y, j] > 0 of
expected noisy accuracy, and a move away loses as much (a move between two wrong classes can shift it too, under
class-dependent noise); under symmetric noise noisy accuracy is an increasing affine function of clean accuracy.
No detector decides which samples count, so nothing favours the route that agrees with the detector.

Arrays in, arrays out: no Ray, no file I/O.
"""

from __future__ import annotations

from typing import Any


def recommend_route(scores: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`scores`: route -> {"accuracy": on the validation split (given labels), "n": how many, ...}, in order of
    preference on a tie -> {"route", "accuracy", "n", "why"}; route None when no route has a score."""
    scored = {r: s for r, s in scores.items() if s.get("n", 0) > 0 and s.get("accuracy") == s.get("accuracy")}
    if not scored:
        return {"route": None, "why": "no validation split (data.val_fraction=0) or no route model to score"}
    best = max(scored, key=lambda r: (scored[r]["accuracy"], -list(scored).index(r)))
    top = scored[best]["accuracy"]
    tied = [r for r, s in scored.items() if r != best and s["accuracy"] == top]
    runner_up = max((s["accuracy"] for r, s in scored.items() if r != best), default=None)
    if tied:
        margin = f", tied with {', '.join(tied)}: the first listed (the cheaper) is taken"
    else:
        margin = "" if runner_up is None else f", {top - runner_up:+.4f} over the next route"
    why = (
        f"highest accuracy on the {scored[best]['n']} validation samples (their given labels) "
        f"({scored[best]['accuracy']:.4f}{margin}); the test split was not read"
    )
    return {"route": best, "accuracy": scored[best]["accuracy"], "n": scored[best]["n"], "why": why}
