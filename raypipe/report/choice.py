"""The route a run recommends, chosen without the test split: every route's model scored on the whole validation
split against its given labels (noisy like the training labels), the most accurate recommended
(`raypipe.core.choice.recommend_route`). Its score on the validation samples that detection judged clean
(``partition/val_cleaned/``) is kept beside it as evidence, not used to choose: those samples are the ones the
detector agreed with, and a route trained to agree with the same detector (relabel, above all) scores high on
them whether it is right or not (measured in docs/departures.md). The test split is never read here."""

from __future__ import annotations

from typing import Any

import numpy as np

from raypipe import layout, storage
from raypipe.config import ROUTES
from raypipe.core.choice import noise_corrected_accuracy, recommend_route
from raypipe.data import samples_from_table
from raypipe.layout import RunLayout
from raypipe.stages.data import read_split
from raypipe.training.checkpoint import load_model
from raypipe.training.loop import predict_logits, resolve_device


def _val_sets(run_layout: RunLayout) -> dict[str, Any]:
    """The validation split (key ""), and the part of it detected as clean (key "_cleaned") when there is one."""
    sets = {}
    if storage.exists(layout.split_file(run_layout.stage("data"), "val")):
        sets[""] = read_split(run_layout.stage("data"), "val")
    cleaned = layout.cleaned_val_file(run_layout.stage("partition"))
    if storage.exists(cleaned):
        sets["_cleaned"] = samples_from_table(storage.read_table(cleaned))
    return {k: s for k, s in sets.items() if len(s) > 0}


def _transition_estimate(run_layout: RunLayout) -> np.ndarray | None:
    """The partition's estimated noise transition T [C, C] (None when it made none: no kNN neighbours)."""
    manifest = storage.read_manifest(run_layout.stage("partition")) or {}
    transition = manifest.get("summary", {}).get("transition_matrix") or {}
    return np.asarray(transition["estimate"]) if "estimate" in transition else None


def val_scores(run_layout: RunLayout, routes: list[str], corrected: bool = False) -> dict[str, dict[str, Any]]:
    """route -> {"accuracy", "n"} on the validation split (given labels) and {"accuracy_cleaned", "n_cleaned"} on its
    samples detected as clean, for each of `routes` whose model exists (in `ROUTES` order, the cheaper first); {}
    when the run has no validation split. `corrected`: also "accuracy_corrected", the same predictions against the
    true labels as the partition's estimated noise transition implies (bench/matched_budget.py measures it as a
    rule; not in the report: with the estimate's errors under class pairs it went above 1, docs/departures.md)."""
    sets = _val_sets(run_layout)
    if "" not in sets:
        return {}
    transition = _transition_estimate(run_layout) if corrected else None
    device = resolve_device("cpu")
    scores = {}
    for route in (r for r in ROUTES if r in routes and storage.exists(run_layout.model(r))):
        model = load_model(run_layout.model(route))[0].to(device)
        scores[route] = {}
        for suffix, val in sets.items():
            predicted = predict_logits(model, val.x, 512, device).argmax(axis=1)
            scores[route][f"accuracy{suffix}"] = float((predicted == val.label).mean())
            scores[route][f"n{suffix}"] = len(val)
            if suffix == "" and transition is not None:
                scores[route]["accuracy_corrected"] = noise_corrected_accuracy(predicted, val.label, transition)
    return scores


def recommendation(run_layout: RunLayout, routes: list[str]) -> dict[str, Any]:
    """report.json's `recommended_route`: the route, why, and the evidence (every route's validation scores)."""
    scores = val_scores(run_layout, routes)
    return {**recommend_route(scores), "evidence": scores}
