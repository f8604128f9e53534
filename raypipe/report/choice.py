"""The route a run recommends, chosen without the test split: every route's model scored on the validation
samples its own detection judged clean (``partition/val_cleaned/``, their given labels), the most accurate
recommended (`raypipe.core.choice.recommend_route`). The test split is never read here."""

from __future__ import annotations

from typing import Any

from raypipe import layout, storage
from raypipe.config import ROUTES
from raypipe.core.choice import recommend_route
from raypipe.data import samples_from_table
from raypipe.layout import RunLayout
from raypipe.training.checkpoint import load_model
from raypipe.training.loop import evaluate, resolve_device


def cleaned_val_scores(run_layout: RunLayout, routes: list[str]) -> dict[str, dict[str, Any]]:
    """route -> {"accuracy", "n"} on the validation samples detected as clean, for each of `routes` whose model
    exists (in `ROUTES` order, the cheaper first); {} when the partition detected no validation split."""
    cleaned = layout.cleaned_val_file(run_layout.stage("partition"))
    if not storage.exists(cleaned):
        return {}
    val = samples_from_table(storage.read_table(cleaned))
    if len(val) == 0:
        return {}
    device = resolve_device("cpu")
    scores = {}
    for route in (r for r in ROUTES if r in routes and storage.exists(run_layout.model(r))):
        model = load_model(run_layout.model(route))[0].to(device)
        scores[route] = {"accuracy": evaluate(model, val.x, val.label, device)["accuracy"], "n": len(val)}
    return scores


def recommendation(run_layout: RunLayout, routes: list[str]) -> dict[str, Any]:
    """report.json's `recommended_route`: the route, why, and the evidence (every route's cleaned-val score)."""
    scores = cleaned_val_scores(run_layout, routes)
    return {**recommend_route(scores), "evidence": scores}
