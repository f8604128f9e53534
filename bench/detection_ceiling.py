"""The detection ceiling: how well could any detector find the wrong labels of a noisy training split if it had a
model trained on the TRUE labels and the true noise transition matrix T? Fashion-MNIST, cnn_small, the same splits
and noises as bench/class_noise.py.

Per seed, one K-fold cross-fit on the true labels (K models with the Initial's recipe, each predicting the fold it
did not see: out-of-sample class probabilities P(true class | x)); the images and true labels are the same under
every noise of a seed, so every noise reuses it. Per noise, from those probabilities:
- `bayes`: P(label wrong | x, given label) by Bayes with the true T (`corruption_posterior`), flagged where >= 0.5
  (the decision that makes the fewest mistakes) and, per given class, its true share of wrong labels (`quota`);
- `1 - p(given)`: the clean model's doubt in the given label, per-class quota with the true shares.
No detector that sees only the noisy labels gets a better model of P(true class | x) than one trained on the true
labels with the same architecture and data, so these rows bound from above what the pipeline's `auto` can reach
(bench/class_noise.md) at this model and data size. The clean models' own out-of-sample accuracy is in each row.

    .venv/bin/python bench/detection_ceiling.py [--quick] [--noises sym20,sym40,sym60,pairs40,cyclic40]
        [--seeds 0,1,2] [--n 20000] [--epochs 15] [--folds 3] [--results DIR] [--runs DIR]
"""

from __future__ import annotations

import json
import time

import common as C
import numpy as np
from class_noise import GIVEN_GOALS, GOALS, NOISES, overrides, split_options
from detection_vs_cleanlab import scores

from raypipe import pipeline
from raypipe.core.detection.transition import (
    corruption_posterior,
    empirical_transition,
    noisy_share_per_given_class,
    quota_flags,
)
from raypipe.executors import LocalExecutor
from raypipe.layout import RunLayout
from raypipe.stages.data import read_split


def noisy_split(b: C.Bench, noise: str, seed: int, args, log):
    """The data stage of class_noise's run for (noise, seed) (its settings, so the same split and labels) -> the
    training split with its ground truth."""
    out = b.runs(noise, f"seed{seed}")
    cfg = b.config([*overrides(args.n, args.epochs, args.model, seed), *NOISES[noise]])
    lay = RunLayout(str(out.resolve()))
    pipeline.Run(cfg, lay, LocalExecutor(log), log).run(["data"])
    return cfg, read_split(lay.stage("data"), "train")


def clean_probabilities(cfg, train, folds: int, seed: int, log) -> tuple[np.ndarray, dict]:
    """float64 [N, C] out-of-sample P(true class | x): `folds` models of the Initial's recipe, each trained on the
    other folds' TRUE labels -> (probabilities, {accuracy, seconds})."""
    import torch
    from sklearn.model_selection import StratifiedKFold

    from raypipe.core.models import build_model
    from raypipe.training.loop import predict_logits, train_arrays

    probs = np.zeros((len(train), train.num_classes), dtype=np.float64)
    start = time.perf_counter()
    split = StratifiedKFold(folds, shuffle=True, random_state=seed).split(train.x, train.true_label)
    for k, (fit_rows, held_out) in enumerate(split):
        torch.manual_seed(seed + k)
        model = build_model(cfg.model, train.sample_shape, train.num_classes)
        train_arrays(model, train.x[fit_rows], train.true_label[fit_rows], cfg.initial, "initial", seed=seed + k)
        logits = predict_logits(model, train.x[held_out], 1024, torch.device("cpu"))
        probs[held_out] = torch.tensor(logits).double().softmax(1).numpy()
        log(f"[ceiling] seed {seed} fold {k + 1}/{folds}: {time.perf_counter() - start:.1f} s")
    accuracy = float((probs.argmax(1) == train.true_label).mean())
    return probs, {"clean_oof_accuracy": accuracy, "seconds_cross_fit": time.perf_counter() - start}


def ceiling(train, probs: np.ndarray) -> dict:
    """The ceiling rows for one noisy split, from out-of-sample clean probabilities [N, C]."""
    truth, given = train.is_corrupted, train.label
    t = empirical_transition(train.true_label, given, train.num_classes)
    prior = np.bincount(train.true_label, minlength=train.num_classes) / len(given)
    share = noisy_share_per_given_class(t, prior)  # the true share of wrong labels in each given class
    posterior = corruption_posterior(probs, t, given)
    doubt = 1.0 - probs[np.arange(len(given)), given]
    return {
        "bayes_0.5": scores(truth, posterior >= 0.5, posterior),
        "bayes_quota": scores(truth, quota_flags(posterior, given, share), posterior),
        "doubt_quota": scores(truth, quota_flags(doubt, given, share), doubt),
        "noise_rate": float(truth.mean()),
    }


def measured_auto(n: int) -> dict:
    """`auto`'s F1 per noise from bench/results/class_noise.json (its first seed), when it ran at this size."""
    path = C.BENCH / "results" / "class_noise.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if data["meta"]["params"].get("train_samples") != n:
        return {}
    return {noise: next(iter(seeds.values())) for noise, seeds in data["results"].items()}


def render(results: dict, auto: dict) -> str:
    header = ["noise", "seeds", "clean model acc", "bayes >= 0.5 F1", "bayes quota F1", "AUROC (bayes)"]
    header += ["1 - p(given) quota F1", "auto F1 (class_noise)", "auto F1, given model"]
    rows = []
    for noise, per_seed in results.items():
        runs = list(per_seed.values())

        def mean_std(key: str, metric: str, runs: list = runs) -> str:
            v = np.array([r[key][metric] for r in runs])
            return f"{v.mean():.3f}" + (f" ± {v.std():.3f}" if len(v) > 1 else "")

        acc = np.array([r["clean_oof_accuracy"] for r in runs])
        seen = auto.get(noise, {})
        rows.append(
            [
                noise,
                len(runs),
                f"{acc.mean():.3f}",
                mean_std("bayes_0.5", "f1"),
                mean_std("bayes_quota", "f1"),
                mean_std("bayes_quota", "auroc"),
                mean_std("doubt_quota", "f1"),
                seen.get("auto", {}).get("f1", "—"),
                seen.get("given", {}).get("f1", "—"),
            ]
        )
    return C.md_table(header, rows, 3)


def goals(results: dict) -> list[list]:
    """Each detection goal of class_noise against its ceiling: a goal above the ceiling cannot be met by any
    detector with this model and data (met = the goal is at or below the mean ceiling F1)."""
    rows = []
    for label, targets in (("auto", GOALS), ("auto, given model", GIVEN_GOALS)):
        for noise, target in targets.items():
            if noise in results:
                best = max(
                    float(np.mean([r[key]["f1"] for r in results[noise].values()]))
                    for key in ("bayes_0.5", "bayes_quota")
                )
                rows.append([f"{label} F1 >= {target} at {noise} is within the ceiling", f"{best:.3f}", target <= best])
    return rows


def main() -> None:
    parser = C.parser(__doc__)
    split_options(parser, 15, "epochs of each clean fold model")
    args = parser.parse_args()
    b = C.Bench.start("detection_ceiling", args)
    if b.quick:
        args.n, args.epochs, args.folds = 600, 2, 2
        noises, seeds = ["sym40", "pairs40"], [0]
    else:
        noises, seeds = args.noises.split(","), [int(s) for s in args.seeds.split(",")]
    log = C.log_to(b.runs("log.txt"))
    results: dict[str, dict] = {noise: {} for noise in noises}
    for seed in seeds:
        print(f"== seed {seed}: data, then {args.folds} clean models", C.loadavg(), flush=True)
        splits = {noise: noisy_split(b, noise, seed, args, log) for noise in noises}
        cfg, first = splits[noises[0]]
        for noise, (_, train) in splits.items():  # one cross-fit serves every noise: same images, same truth
            same = np.array_equal(train.sample_id, first.sample_id) and np.array_equal(
                train.true_label, first.true_label
            )
            if not same:
                raise RuntimeError(f"seed {seed}: {noise}'s split differs from {noises[0]}'s")
        probs, fit = clean_probabilities(cfg, first, args.folds, seed, log)
        for noise, (_, train) in splits.items():
            results[noise][seed] = {**fit, **ceiling(train, probs)}
    params = {
        "train_samples": args.n,
        "model": args.model,
        "clean fold models": f"{args.folds}-fold, Adam lr 1e-3, batch 128, {args.epochs} epochs, on the true labels",
        "noises": {k: NOISES[k] for k in noises},
        "seeds": f"{seeds} (run.seed = noise.seed = data.split_seed, as in class_noise)",
        "torch_threads": args.threads,
    }
    body = "\n".join(
        [render(results, measured_auto(args.n)), "", *C.goals_md(goals(results), "Against the goals: within reach?")]
    )
    title = "Detection ceiling: a model trained on the true labels, with the true T"
    b.write(title, body, {"results": results}, params)


if __name__ == "__main__":
    main()
