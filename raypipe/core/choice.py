"""The route to recommend, chosen without the test split: the one most accurate on the validation samples
that detection judged clean (ties: the first in the order given, i.e. the cheaper route first).

Arrays in, arrays out: no Ray, no file I/O.
"""

from __future__ import annotations

from typing import Any


def recommend_route(scores: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`scores`: route -> {"accuracy": on the validation samples detected as clean, "n": how many}, in order of
    preference on a tie -> {"route", "accuracy", "n", "why"}; route None when no route has a score."""
    scored = {r: s for r, s in scores.items() if s.get("n", 0) > 0 and s.get("accuracy") == s.get("accuracy")}
    if not scored:
        return {"route": None, "why": "no validation sample was detected as clean (or no validation split)"}
    best = max(scored, key=lambda r: (scored[r]["accuracy"], -list(scored).index(r)))
    top = scored[best]["accuracy"]
    tied = [r for r, s in scored.items() if r != best and s["accuracy"] == top]
    runner_up = max((s["accuracy"] for r, s in scored.items() if r != best), default=None)
    if tied:
        margin = f", tied with {', '.join(tied)}: the first listed (the cheaper) is taken"
    else:
        margin = "" if runner_up is None else f", {top - runner_up:+.4f} over the next route"
    why = (
        f"highest accuracy on the {scored[best]['n']} validation samples detected as clean "
        f"({scored[best]['accuracy']:.4f}{margin}); the test split was not read"
    )
    return {"route": best, "accuracy": scored[best]["accuracy"], "n": scored[best]["n"], "why": why}
