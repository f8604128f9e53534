"""Detection of mislabelled samples: raypipe's partition vs cleanlab's confident learning.

cleanlab (`cleanlab.filter.find_label_issues`, default filter_by=prune_by_noise_rate) on K-fold
out-of-sample predicted probabilities: K fresh models of the same architecture, each trained with
raypipe's Initial recipe (same epochs, optimizer, batch) on K-1 folds and predicting the held-out fold.
raypipe: the partition of the same noisy training set, detection.signal=auto (the default: every
signal, combined without ground truth) and detection.signal=knn, from the Initial model.

Wall time includes the trainings each needs: cleanlab K trainings + predictions + find_label_issues;
raypipe the Initial training (which a user who repairs a deployed model already has: shown both
with and without it) + attribution + partition.

The data and Initial stages are seeded from label_noise.py's base run (<runs>/label_noise/<noise>/auto)
when present; the pipeline's manifests decide whether they match (identical settings) and are skipped.

    .venv/bin/python bench/detection_vs_cleanlab.py [--quick] [--n 4000] [--epochs 80] [--folds 3]
        [--results DIR] [--runs DIR]
"""

from __future__ import annotations

import time
from pathlib import Path

import common as C
import numpy as np

from raypipe import storage
from raypipe.layout import RunLayout

NOISES = {
    "sym40": ["noise.kind=symmetric", "noise.rate=0.4"],
    "asym40": ["noise.kind=asymmetric", "noise.rate=0.4", "noise.pairs=dataset"],
}


def scores(truth: np.ndarray, flagged: np.ndarray, suspicion: np.ndarray | None = None) -> dict[str, float]:
    from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

    p, r, f, _ = precision_recall_fscore_support(truth, flagged, average="binary", zero_division=0)
    out = {"precision": float(p), "recall": float(r), "f1": float(f), "n_flagged": int(flagged.sum())}
    if suspicion is not None:
        out["auroc"] = float(roc_auc_score(truth, suspicion))
    return out


def cleanlab_detect(cfg, run: RunLayout, folds: int, seed: int, log) -> dict:
    import torch
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    from sklearn.model_selection import StratifiedKFold

    from raypipe.core.models import build_model
    from raypipe.stages.data import read_split
    from raypipe.training.loop import predict_logits, train_arrays

    train = read_split(run.stage("data"), "train")  # the noisy training split, with its ground truth
    device = torch.device("cpu")
    probs = np.zeros((len(train), train.num_classes), dtype=np.float64)
    fold_seconds = []
    t0, cpu0 = time.perf_counter(), time.process_time()
    for k, (tr, ho) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=seed).split(train.x, train.label)):
        s = time.perf_counter()
        torch.manual_seed(seed + k)
        model = build_model(cfg.model, train.sample_shape, train.num_classes)
        res = train_arrays(model, train.x[tr], train.label[tr], cfg.initial, "initial", seed=seed + k)
        logits = predict_logits(model, train.x[ho], 1024, device)
        probs[ho] = torch.tensor(logits).double().softmax(1).numpy()
        fold_seconds.append(time.perf_counter() - s)
        log(
            f"[cleanlab] fold {k + 1}/{folds}: {fold_seconds[-1]:.1f} s, "
            f"train acc {res.history[-1]['train_accuracy']:.3f}"
        )
    s = time.perf_counter()
    issues = find_label_issues(train.label, probs, filter_by="prune_by_noise_rate")
    quality = get_label_quality_scores(train.label, probs)
    find_seconds = time.perf_counter() - s
    total = time.perf_counter() - t0
    cpu_total = time.process_time() - cpu0
    return {
        **scores(train.is_corrupted, issues, 1.0 - quality),
        "seconds_total": total,
        "cpu_seconds_total": cpu_total,
        "seconds_folds": fold_seconds,
        "seconds_find_label_issues": find_seconds,
        "oof_accuracy_given": float((probs.argmax(1) == train.label).mean()),
    }


def raypipe_detect(done: C.Finished, initial_seconds: float) -> dict:
    det = done.report["detection"]
    st = done.report["stages_seconds"]
    detect_s = st.get("attribution", 0.0) + st.get("partition", 0.0)
    cpu = done.cpu_seconds
    detect_cpu = cpu.get("attribution", 0.0) + cpu.get("partition", 0.0)
    return {
        "precision": det["precision"],
        "recall": det["recall"],
        "f1": det["f1"],
        "auroc": det["auroc"],
        "n_flagged": det["n_flagged"],
        "signals_used": det.get("signals_used"),
        "seconds_detection": detect_s,
        "seconds_initial": initial_seconds,
        "seconds_total": detect_s + initial_seconds,
        "cpu_seconds_detection": detect_cpu,
    }


def main() -> None:
    parser = C.parser(__doc__)
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--model", default="mlp")
    args = parser.parse_args()
    b = C.Bench.start("detection_vs_cleanlab", args)
    n, epochs, noises = (1000, 3, ["sym40"]) if b.quick else (args.n, args.epochs, list(NOISES))
    # label_noise.py's settings, so its data / initial stages are reused.
    common = C.label_noise_overrides(n, epochs, args.model, 1 if b.quick else 10)
    params = {
        "train_samples": n,
        "model": args.model,
        "initial (and each cleanlab fold)": f"Adam lr 1e-3, batch 64, {epochs} epochs",
        "folds": args.folds,
        "cleanlab": "2.9 find_label_issues(filter_by=prune_by_noise_rate); AUROC from 1 - get_label_quality_scores",
        "seeds": "run.seed=0, noise.seed=0, data.split_seed=0, folds StratifiedKFold(random_state=0)",
        "torch_threads": args.threads,
    }
    results, table = {}, []
    for noise in noises:
        base_dir = C.fresh_dir(b.runs(noise, "auto"))
        src = Path(args.runs, "label_noise" + ("_quick" if b.quick else ""), noise, "auto")
        if storage.read_manifest(RunLayout(str(src)).stage("initial")) is not None:
            C.copy_stages(src, base_dir, ("data", "initial"))
        log = C.log_to(base_dir.parent / "log.txt")
        over = [*common, *NOISES[noise]]
        print(f"== {noise}: raypipe auto", C.loadavg(), flush=True)
        done = C.run_pipeline(b.config([*over, "detection.signal=auto", "run.routes=[]"]), base_dir, log)
        init_s = done.report["stages_seconds"]["initial"]  # from its manifest, also when it was reused
        ours = {"auto": raypipe_detect(done, init_s)}
        print(f"== {noise}: raypipe knn", C.loadavg(), flush=True)
        knn = b.run_variant(base_dir, base_dir.parent / "knn", [*over, "detection.signal=knn", "run.routes=[]"], log)
        ours["knn"] = raypipe_detect(knn, init_s)
        print(f"== {noise}: cleanlab {args.folds}-fold", C.loadavg(), flush=True)
        load_before = C.loadavg()
        cl = cleanlab_detect(b.config(over), done.layout, args.folds, 0, log)
        cl["loadavg_before"], cl["loadavg_after"] = load_before, C.loadavg()
        results[noise] = {
            "raypipe": ours,
            "cleanlab": cl,
            "reused_stages": done.skipped,
            "initial_train_accuracy_given": done.report["routes"]["initial"].get("train_accuracy_given_labels"),
        }
        for name, r in ours.items():
            table.append(
                [
                    noise,
                    f"raypipe {name}",
                    r["precision"],
                    r["recall"],
                    r["f1"],
                    r["auroc"],
                    r["n_flagged"],
                    f"{r['seconds_detection']:.1f} ({r['cpu_seconds_detection']:.1f})",
                    f"{r['seconds_total']:.1f}",
                    f"{r['seconds_detection'] / cl['seconds_total']:.3f} / "
                    f"{r['seconds_total'] / cl['seconds_total']:.3f}"
                    f" (CPU, given: {r['cpu_seconds_detection'] / cl['cpu_seconds_total']:.3f})",
                ]
            )
        table.append(
            [
                noise,
                f"cleanlab {args.folds}-fold",
                cl["precision"],
                cl["recall"],
                cl["f1"],
                cl["auroc"],
                cl["n_flagged"],
                "—",
                f"{cl['seconds_total']:.1f} ({cl['cpu_seconds_total']:.1f})",
                "1",
            ]
        )
    goal_rows = []
    for noise, r in results.items():
        best_name, best = max(r["raypipe"].items(), key=lambda kv: kv[1]["f1"])
        cl = r["cleanlab"]
        goal_rows.append(
            [
                f"{noise}: detection F1 >= cleanlab's at <= 1/3 of its wall time",
                f"raypipe {best_name} F1 {best['f1']:.3f} vs cleanlab {cl['f1']:.3f}; time ratio "
                f"{best['seconds_detection'] / cl['seconds_total']:.3f} (model given) / "
                f"{best['seconds_total'] / cl['seconds_total']:.3f} (incl. Initial training)",
                f"{best['f1'] >= cl['f1'] and best['seconds_total'] <= cl['seconds_total'] / 3} (incl. Initial); "
                f"{best['f1'] >= cl['f1'] and best['seconds_detection'] <= cl['seconds_total'] / 3} (model given)",
            ]
        )
    body = "\n".join(
        [
            "## Detection of the corrupted samples (ground truth used only to score)",
            "",
            C.md_table(
                [
                    "noise",
                    "method",
                    "precision",
                    "recall",
                    "F1",
                    "AUROC",
                    "flagged",
                    "s detection, model given (CPU s)",
                    "s incl. trainings (CPU s)",
                    "time / cleanlab (given / incl.)",
                ],
                table,
                3,
            ),
            "",
            "raypipe's `s incl. trainings` adds the Initial model's training (raypipe trains it once; it is also the "
            "model being repaired); cleanlab's is K trainings + out-of-fold predictions + find_label_issues.",
            "",
            *C.goals_md(goal_rows),
        ]
    )
    b.write("Detection: raypipe vs cleanlab", body, {"results": results}, params)


if __name__ == "__main__":
    main()
