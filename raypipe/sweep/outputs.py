"""What a finished sweep writes: one row per trial (trials.csv / trials.parquet), the best trial's
outputs under ``best/`` (config.yaml that `raypipe run` repeats it with, model.pt, report.json with
its metrics on the test split), and the objective plot."""

from __future__ import annotations

import csv
import io
import math
from typing import Any

import pyarrow as pa

from raypipe import layout, storage
from raypipe.config import Config, dump_config
from raypipe.layout import SweepLayout
from raypipe.report.plots import objective_figure, write_figure
from raypipe.stages.data import read_split
from raypipe.sweep.space import AXES, TrialSpec, trial_config
from raypipe.sweep.trial import METRIC, trial_history, validation_set
from raypipe.training.checkpoint import load_model, save_model
from raypipe.training.loop import evaluate, resolve_device

TABLE_COLUMNS = ("trial_id", *AXES, "epochs_run", METRIC, "val_macro_f1", "n_clean", "status", "message")
STATUSES = ("completed", "stopped_early", "infeasible", "error")


def trial_row(sweep_uri: str, trial_id: str, spec: TrialSpec, error: str | None) -> dict[str, Any]:
    """A trial's line in trials.csv, from what its folder holds (the model its objective belongs to)."""
    lay = SweepLayout(sweep_uri)
    history = trial_history(sweep_uri, trial_id, spec)
    last = history[-1] if history else {}
    infeasible_uri = lay.trial_file(trial_id, "infeasible.json")
    partition = storage.read_manifest(lay.trial(trial_id, spec.rule).stage("partition"))
    if error:
        status, message = "error", error.strip().splitlines()[-1][:300] if error.strip() else "error"
    elif storage.exists(infeasible_uri):
        status, message = "infeasible", storage.read_json(infeasible_uri)["message"]
    elif not history:
        status, message = "error", f"no finished epoch in '{lay.trial_dir(trial_id)}'"
    elif len(history) < spec.epochs:
        status, message = "stopped_early", f"stopped by ASHA after {len(history)} of {spec.epochs} epochs"
    else:
        status, message = "completed", ""
    return {
        "trial_id": trial_id,
        **spec.to_dict(),
        "epochs_run": len(history),
        METRIC: float(last.get(METRIC, float("nan"))),
        "val_macro_f1": float(last.get("val_macro_f1", float("nan"))),
        "n_clean": int(partition["summary"]["n_clean"]) if partition else -1,
        "status": status,
        "message": message,
    }


def choose_best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The trial with the highest objective (after its last epoch); ties go to the earlier trial."""
    scored = [r for r in rows if r["status"] != "error" and math.isfinite(r[METRIC])]
    if not scored:
        return None
    return max(scored, key=lambda r: r[METRIC])  # max keeps the first of equal values


def write_table(sweep_uri: str, rows: list[dict[str, Any]]) -> None:
    lay = SweepLayout(sweep_uri)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(TABLE_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row[k] for k in TABLE_COLUMNS})
    storage.write_bytes(lay.trials_table("csv"), buf.getvalue().encode())
    storage.write_table(lay.trials_table("parquet"), pa.table({k: [row[k] for row in rows] for k in TABLE_COLUMNS}))


def read_table(sweep_uri: str) -> list[dict[str, Any]]:
    """trials.csv back as rows with their types."""
    text = storage.read_bytes(SweepLayout(sweep_uri).trials_table("csv")).decode()
    types = {"lr": float, "epochs": int, "tau": float, "prune_fraction": float, "epochs_run": int}
    types.update({METRIC: float, "val_macro_f1": float, "n_clean": int})
    return [{k: types.get(k, str)(v) for k, v in row.items()} for row in csv.DictReader(io.StringIO(text))]


def _trial_model(sweep_uri: str, trial_id: str, spec: TrialSpec):
    """The model the trial's objective belongs to: the route's model.pt, or its checkpoint when stopped early."""
    route_uri = SweepLayout(sweep_uri).trial(trial_id, spec.rule).stage(spec.route)
    published = layout.model_file(route_uri)
    return load_model(published if storage.exists(published) else layout.checkpoint_file(route_uri))[:2]


def write_best(config: Config, sweep_uri: str, best: dict[str, Any], rows: list[dict[str, Any]], log=print):
    """best/config.yaml, best/model.pt and best/report.json (metrics on the clean test split)."""
    lay = SweepLayout(sweep_uri)
    spec = TrialSpec.from_dict(best)
    model, signature = _trial_model(sweep_uri, best["trial_id"], spec)
    extra = {"sweep_trial": best["trial_id"], "hyperparameters": spec.to_dict(), METRIC: best[METRIC]}
    save_model(layout.model_file(lay.best), model, signature, extra)
    storage.write_bytes(storage.join(lay.best, "config.yaml"), dump_config(trial_config(config, spec)).encode())

    cpu = resolve_device("cpu")
    test = read_split(lay.base.stage("data"), "test")
    val = validation_set(config, sweep_uri, lay.trial(best["trial_id"], spec.rule))
    initial, _, _ = load_model(lay.base.model("initial"))
    partition = storage.read_manifest(lay.trial(best["trial_id"], spec.rule).stage("partition"))
    report = {
        "trial_id": best["trial_id"],
        "hyperparameters": spec.to_dict(),
        "objective": {
            "metric": METRIC,
            "mode": config.sweep.objective,
            "value": best[METRIC],
            "n_val": len(val),
            "epochs_run": best["epochs_run"],
        },
        # The clean test split: reported here for the chosen trial only; never used to choose it.
        "test": evaluate(model, test.x, test.label, cpu),
        "initial": {
            "test": evaluate(initial, test.x, test.label, cpu),
            METRIC: evaluate(initial, val.x, val.label, cpu)["accuracy"],
        },
        "partition": partition["summary"] if partition else None,
        "trials": {"n": len(rows), **{s: sum(r["status"] == s for r in rows) for s in STATUSES}},
    }
    storage.write_json(storage.join(lay.best, "report.json"), report)
    log(
        f"[sweep] best trial {best['trial_id']}: {spec.to_dict()}; {METRIC} ({config.sweep.objective}) "
        f"{best[METRIC]:.4f}, test accuracy {report['test']['accuracy']:.4f} "
        f"(initial {report['initial']['test']['accuracy']:.4f})"
    )
    return report


def write_outputs(
    config: Config, sweep_uri: str, trials: list[tuple[str, TrialSpec, str | None]], log=print
) -> dict[str, Any]:
    """trials.csv / .parquet, best/ and plots/ from (trial_id, spec, error or None) of every trial."""
    rows = [trial_row(sweep_uri, trial_id, spec, error) for trial_id, spec, error in trials]
    write_table(sweep_uri, rows)
    best = choose_best(rows)
    report = write_best(config, sweep_uri, best, rows, log) if best else None
    if best is None:
        log("[sweep] no trial produced an objective; see trials.csv")
    figure = objective_figure(rows, config.sweep.objective, METRIC)
    write_figure(figure, SweepLayout(sweep_uri).plot("objective"), log)
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    log(f"[sweep] {len(rows)} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return {"rows": rows, "best": best, "report": report, "counts": counts}
