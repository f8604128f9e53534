"""Detection under class-dependent noise, and from a model raypipe did not train: Fashion-MNIST, cnn_small, the
Initial trained until it fits its noisy labels; noise symmetric 20 / 40 / 60%, class pairs 40% (the data set's
documented pairs) and cyclic 40% (every class to the next); several seeds (noise, split and training seeded alike).

Per (noise, seed) one Initial is trained, once, and reused by every detector:
- `auto` (the pipeline's default: every signal, the decision auto takes), the base run;
- every signal alone, through the same per-class decision `auto` takes (read back from the base run's signals
  shards and trajectory: no retraining, no new pass over the data);
- `given`: the same Initial handed over as `model.checkpoint` (no trajectory, no early checkpoint): a new
  attribution pass and partition;
- cleanlab's `find_label_issues` on K-fold out-of-sample probabilities (K trainings of the Initial's recipe on
  (K-1)/K of the data), for the seeds in --cleanlab-seeds.
Columns: precision, recall, F1, AUROC (mean ± std over seeds), the noise transition estimate's error (mean
|T-hat - T|), the decision taken, and detection wall time given the trained model (attribution + partition).

Iterating on detection without retraining: rerun with the same --runs and `--from partition`: every finished
Initial and attribution pass is reused (their manifests match) and only the partitions are recomputed.

    .venv/bin/python bench/class_noise.py [--quick] [--noises sym20,sym40,sym60,pairs40,cyclic40] [--seeds 0,1,2]
        [--one-seed sym20,sym60] [--n 20000] [--epochs E] [--cleanlab-seeds 0] [--folds 3] [--from partition]
        [--results DIR] [--runs DIR]
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import common as C
import numpy as np
import pyarrow as pa
from detection_vs_cleanlab import cleanlab_detect

from raypipe import layout, storage
from raypipe.core.metrics import detection_metrics
from raypipe.stages import partition
from raypipe.tables import columns_from_table

NOISES = {
    "sym20": ["noise.kind=symmetric", "noise.rate=0.2"],
    "sym40": ["noise.kind=symmetric", "noise.rate=0.4"],
    "sym60": ["noise.kind=symmetric", "noise.rate=0.6"],
    "pairs40": ["noise.kind=asymmetric", "noise.rate=0.4", "noise.pairs=dataset"],
    "cyclic40": ["noise.kind=asymmetric", "noise.rate=0.4", "noise.pairs=cyclic"],
}
GOALS = {"sym40": 0.95, "pairs40": 0.85, "cyclic40": 0.85}  # auto F1 with the Initial trained here
GIVEN_GOALS = {"sym40": 0.90, "pairs40": 0.75}  # auto F1 from a given model (no trajectory)
METRICS = ("precision", "recall", "f1", "auroc")


def overrides(n: int, epochs: int, model: str, seed: int) -> list[str]:
    """The run's settings: the Initial's recipe (measured to fit its labels fastest: docs/benchmarks.md), seeds."""
    return [
        f"data.max_train_samples={n}",
        "data.shard_rows=4096",
        f"model.name={model}",
        f"initial.epochs={epochs}",
        "initial.optimizer=adam",
        "initial.lr=1e-3",
        "initial.batch_size=128",
        "attribution.rule=loss",
        "run.executor=local",
        "run.routes=[]",
        f"run.seed={seed}",
        f"noise.seed={seed}",
        f"data.split_seed={seed}",
    ]


def detector_rows(done: C.Finished) -> tuple[dict[str, dict], dict[str, dict]]:
    """Read back a finished run's signals (no new pass over the data) -> (every signal alone, decided the way `auto`
    decides: the same transition estimate and decision rule; `auto`'s combined score under each decision method),
    each scored against the ground truth."""
    lay, cfg = done.layout, done.run.config
    part = lay.stage("partition")
    tables = [storage.read_table(u) for u in storage.list_files(layout.signals_dir(part), ".parquet")]
    cols = columns_from_table(pa.concat_tables(tables))
    num_classes = done.run.summary("data")["num_classes"]
    transition = done.run.summary("partition")["transition_matrix"]
    signals = partition.gather_signals(cols, layout.trajectory_dir(lay.stage("initial")), transition)

    def scored(chosen: dict, decision: str) -> dict:
        det = dataclasses.replace(cfg.detection, signal="auto", decision=decision)
        p_noisy, score, used = partition.decide(chosen, cols["label"], num_classes, det, cfg.run.seed, transition)
        m = detection_metrics(cols["is_corrupted"], p_noisy, cfg.partition.tau)
        m["auroc"] = detection_metrics(cols["is_corrupted"], np.asarray(score, dtype=np.float64), 0.5)["auroc"]
        return {**m, "decision_taken": used["decision_taken"]}

    alone = {name: scored({name: score}, cfg.detection.decision) for name, score in signals.items()}
    by_decision = {decision: scored(signals, decision) for decision in ("mixture", "quota", "threshold")}
    return alone, by_decision


def run_result(done: C.Finished) -> dict:
    det = done.report["detection"]
    stages = done.report["stages_seconds"]
    transition = det.get("transition_matrix") or {}
    return {
        **{k: det[k] for k in (*METRICS, "n_flagged", "n_corrupted", "auroc_score")},
        "signals_used": det["signals_used"],
        "transition_error": transition.get("error"),
        "transition_space": transition.get("space"),
        "transition_concentration": transition.get("structure", {}).get("concentration"),
        "seconds_detection": stages.get("attribution", 0.0) + stages.get("partition", 0.0),
        "seconds_partition": stages.get("partition", 0.0),
    }


def one_seed(b: C.Bench, noise: str, seed: int, args, log, cleanlab: bool) -> dict:
    base_dir = b.runs(noise, f"seed{seed}", "auto")
    base_dir.mkdir(parents=True, exist_ok=True)  # an earlier run's finished stages are reused (manifests match)
    over = [*overrides(args.n, args.epochs, args.model, seed), *NOISES[noise]]
    print(f"== {noise} seed {seed}: Initial + auto", C.loadavg(), flush=True)
    done = C.run_pipeline(b.config(over), base_dir, log, from_stage=args.from_stage)
    initial = done.report["routes"]["initial"]
    out = {
        "initial": {
            "train_accuracy_given_labels": initial["train_accuracy_given_labels"],
            "test_accuracy": initial["accuracy"],
            "epochs": initial["epochs"],
            "seconds_train": initial["seconds_train"],
        },
        "auto": run_result(done),
    }
    out["signals"], out["auto_by_decision"] = detector_rows(done)
    print(f"== {noise} seed {seed}: given model", C.loadavg(), flush=True)
    given_dir = b.runs(noise, f"seed{seed}", "given")
    given = C.run_pipeline(
        b.config([*over, f"model.checkpoint={done.layout.model('initial')}"]),
        _seeded(done, given_dir),
        log,
        from_stage=args.from_stage,
    )
    out["given"] = run_result(given)
    if cleanlab:
        out["cleanlab"] = cleanlab_once(b, noise, seed, over, done, args, log)
    return out


def cleanlab_once(b: C.Bench, noise: str, seed: int, over: list[str], done: C.Finished, args, log) -> dict:
    """cleanlab's K-fold detection, or its saved result for the same data and recipe (``cleanlab.json`` beside the
    runs: a `--from partition` rerun does not pay the K trainings again; the file keeps its load averages)."""
    saved = b.runs(noise, f"seed{seed}", "cleanlab.json")
    key = {"overrides": over, "folds": args.folds}
    if saved.exists() and not args.fresh_cleanlab:
        cached = json.loads(saved.read_text())
        if cached.get("key") == key:
            return {**cached["result"], "reused_from": C.shown(saved)}
    print(f"== {noise} seed {seed}: cleanlab {args.folds}-fold", C.loadavg(), flush=True)
    load_before, start = C.loadavg(), time.perf_counter()
    result = cleanlab_detect(b.config(over), done.layout, args.folds, seed, log)
    result.update(loadavg_before=load_before, loadavg_after=C.loadavg(), wall_seconds=time.perf_counter() - start)
    saved.write_text(json.dumps({"key": key, "result": result}, default=float))
    return result


def _seeded(done: C.Finished, given_dir: Path) -> Path:
    """The given-model run's folder, holding the base run's data stage (skipped: same data settings)."""
    if storage.read_manifest(str(given_dir / "data")) is None:
        C.fresh_dir(given_dir)
        C.copy_stages(Path(done.layout.root), given_dir, ("data",))
    return given_dir


def mean_std(values: list[float]) -> str:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if len(v) == 0:
        return "—"
    return f"{v.mean():.3f}" + (f" ± {v.std():.3f}" if len(v) > 1 else "")


def noise_table(per_seed: dict[int, dict]) -> list[str]:
    seeds = sorted(per_seed)
    header = ["detector", "decision", *METRICS, "T-hat error", "s detection (model given)"]
    rows = []

    def row(name, results, decision):
        rows.append(
            [
                name,
                decision,
                *(mean_std([r[m] for r in results]) for m in METRICS),
                mean_std([r.get("transition_error") for r in results]),
                mean_std([r.get("seconds_detection") for r in results]),
            ]
        )

    auto = [per_seed[s]["auto"] for s in seeds]
    row("**auto**", auto, "/".join(sorted({r["signals_used"]["decision_taken"] for r in auto})))
    given = [per_seed[s]["given"] for s in seeds]
    row("**auto, given model**", given, "/".join(sorted({r["signals_used"]["decision_taken"] for r in given})))
    for decision in per_seed[seeds[0]]["auto_by_decision"]:
        results = [per_seed[s]["auto_by_decision"][decision] for s in seeds]
        row(f"auto's score, decision={decision}", results, decision)
    for name in per_seed[seeds[0]]["signals"]:
        results = [per_seed[s]["signals"][name] for s in seeds if name in per_seed[s]["signals"]]
        row(name, results, "/".join(sorted({r["decision_taken"] for r in results})))
    cl = [per_seed[s]["cleanlab"] for s in seeds if "cleanlab" in per_seed[s]]
    if cl:
        rows.append(
            [
                f"cleanlab (seeds {[s for s in seeds if 'cleanlab' in per_seed[s]]})",
                "find_label_issues",
                *(mean_std([r[m] for r in cl]) for m in METRICS),
                "—",
                f"{mean_std([r['seconds_total'] for r in cl])} (K trainings)",
            ]
        )
    return [C.md_table(header, rows, 3)]


def render(results: dict, seeds: list[int]) -> str:
    lines = []
    for noise, per_seed in results.items():
        init = [per_seed[s]["initial"] for s in sorted(per_seed)]
        auto0 = per_seed[min(per_seed)]["auto"]
        fit = mean_std([i["train_accuracy_given_labels"] for i in init])
        seconds = mean_std([i["seconds_train"] for i in init])
        lines += [
            f"## {noise}",
            "",
            f"Initial: training accuracy on the given labels {fit} after {init[0]['epochs']} epochs ({seconds} s of "
            f"training); clean test accuracy {mean_std([i['test_accuracy'] for i in init])}. Seeds {sorted(per_seed)}.",
            "",
            *noise_table(per_seed),
            "",
            f"`auto` (seed {min(per_seed)}): {auto0['signals_used'].get('why', '')}; decision "
            f"`{auto0['signals_used']['decision_taken']}`: {auto0['signals_used']['decision_why']}.",
            "",
        ]
    return "\n".join(lines)


def goals(results: dict) -> list[list]:
    rows = []
    for noise, target in GOALS.items():
        if noise in results:
            f1 = [r["auto"]["f1"] for r in results[noise].values()]
            rows.append([f"{noise}: auto F1 >= {target}", mean_std(f1), bool(np.mean(f1) >= target)])
    for noise, target in GIVEN_GOALS.items():
        if noise in results:
            f1 = [r["given"]["f1"] for r in results[noise].values()]
            rows.append([f"{noise}, given model: auto F1 >= {target}", mean_std(f1), bool(np.mean(f1) >= target)])
    for noise, per_seed in results.items():
        with_cl = [r for r in per_seed.values() if "cleanlab" in r]
        if not with_cl:
            continue
        ratio = [r["auto"]["seconds_detection"] / r["cleanlab"]["seconds_total"] for r in with_cl]
        ratio_given = [r["given"]["seconds_detection"] / r["cleanlab"]["seconds_total"] for r in with_cl]
        higher = all(min(r["auto"]["f1"], r["given"]["f1"]) > r["cleanlab"]["f1"] for r in with_cl)
        rows.append(
            [
                f"{noise}: detection given the model <= 1/10 of cleanlab's K-fold wall time, higher F1",
                f"time ratio {mean_std(ratio)} (auto) / {mean_std(ratio_given)} (given model); F1 auto "
                f"{mean_std([r['auto']['f1'] for r in with_cl])}, given {mean_std([r['given']['f1'] for r in with_cl])}"
                f" vs cleanlab {mean_std([r['cleanlab']['f1'] for r in with_cl])}",
                bool(max(ratio + ratio_given) <= 0.1 and higher),
            ]
        )
    return rows


def split_options(parser, epochs: int, epochs_help: str) -> None:
    """The options that pick the splits and noises (shared with detection_ceiling.py, which bounds these runs)."""
    parser.add_argument("--n", type=int, default=20000, help="training samples (a subset)")
    parser.add_argument("--epochs", type=int, default=epochs, help=epochs_help)
    parser.add_argument("--model", default="cnn_small")
    parser.add_argument("--noises", default=",".join(NOISES))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--folds", type=int, default=3)


def main() -> None:
    parser = C.parser(__doc__)
    split_options(parser, 30, "Initial epochs (and each cleanlab fold's)")
    parser.add_argument("--one-seed", default="", help="noise settings run at the first seed only (time)")
    parser.add_argument("--cleanlab-seeds", default="0", help="seeds that also run cleanlab's K-fold (time)")
    parser.add_argument("--from", dest="from_stage", default=None, help="recompute from this stage (e.g. partition)")
    parser.add_argument("--fresh-cleanlab", action="store_true", help="rerun cleanlab even when its result is saved")
    args = parser.parse_args()
    b = C.Bench.start("class_noise", args)
    if b.quick:
        # 6 epochs: the default detection.early_epoch (5) is before the last, so the early model is kept (knn_early)
        args.n, args.epochs, args.model, args.folds = 1000, 6, "cnn_small", 3
        noises, seeds, cl_seeds = ["pairs40"], [0], [0]
    else:
        noises, seeds = args.noises.split(","), [int(s) for s in args.seeds.split(",")]
        cl_seeds = [int(s) for s in args.cleanlab_seeds.split(",") if s]
    params = {
        "train_samples": args.n,
        "model": args.model,
        "initial (and each cleanlab fold)": f"Adam lr 1e-3, batch 128, {args.epochs} epochs",
        "noises": {k: NOISES[k] for k in noises},
        "seeds": f"{seeds} (run.seed = noise.seed = data.split_seed); first seed only for: {args.one_seed or '-'}",
        "cleanlab": f"2.x find_label_issues(filter_by=prune_by_noise_rate) on {args.folds}-fold out-of-sample "
        f"probabilities, seeds {cl_seeds}",
        "detection": "defaults (auto signal, auto decision, k=30, early_epoch=5, aum_epochs=10)",
        "torch_threads": args.threads,
    }
    results: dict[str, dict] = {}
    for noise in noises:
        log = C.log_to(b.runs(noise, "log.txt"))
        noise_seeds = seeds[:1] if noise in args.one_seed.split(",") else seeds
        results[noise] = {seed: one_seed(b, noise, seed, args, log, seed in cl_seeds) for seed in noise_seeds}
    body = "\n".join([render(results, seeds), *C.goals_md(goals(results), "Against the goals")])
    b.write("Detection under class-dependent noise", body, {"results": results}, params)


if __name__ == "__main__":
    main()
