"""A repair against retraining at the same cost: every repair route (L-FT, F-FT, Relabel; each from the
pruned and from the unpruned Initial) against Retrain from scratch on the same detected split given (a) the
same wall time as the route and (b) the Initial's full epoch budget; the Oracle (same model and budget on the
truly clean samples) on every row; and whether the route recommended without the test split is the test-best.

Per (noise, seed): one base run (data, Initial, attribution, partition, prune, the three repair routes from the
pruned model, Retrain at the Initial's epochs); the Initial is trained once and every other row reuses it
through the stage table with shared folders (`raypipe.layout.RunLayout.shared`): the repair routes from the
unpruned Initial (prune.fraction=0), and one Retrain per repair row with retrain.time_budget_s set to that
route's wall time (attribution + partition + prune + its fine-tuning, as report.json counts it).

gap closed = (route - Initial) / (Oracle - Initial), clean test split, last epoch; wall ratio = the route's wall
seconds / the Initial's; vs matched = route - Retrain at the route's wall time (accuracy points).

    .venv/bin/python bench/matched_budget.py [--quick] [--seeds 0,1,2] [--noises sym40,pairs40] [--n 20000]
        [--initial-epochs 80] [--ft-epochs 10] [--model cnn_small] [--reuse] [--results DIR] [--runs DIR]
"""

from __future__ import annotations

import json
from pathlib import Path

import common as C
import numpy as np

from raypipe import pipeline
from raypipe.config import FINE_TUNE_ROUTES, ROUTE_TITLES
from raypipe.core.choice import CHOICE_RULE, RULES, recommend_route
from raypipe.executors import LocalExecutor
from raypipe.layout import RunLayout
from raypipe.report.choice import val_scores
from raypipe.report.report import REPAIR_OVERHEAD

NOISES = {
    "sym40": ["noise.kind=symmetric", "noise.rate=0.4"],
    "pairs40": ["noise.kind=asymmetric", "noise.rate=0.4", "noise.pairs=dataset"],
}
STARTS = ("pruned", "unpruned")
GOALS = {"sym40": 0.95, "pairs40": 0.85}  # gap the best repair route must close
MAX_WALL_RATIO, MIN_LEAD, MAX_CHOICE_LOSS, MIN_FIT = 0.2, 0.01, 0.005, 0.95


gap = C.gap


def overrides(n: int, epochs: int, model: str, ft_epochs: int, noise: str, seed: int) -> list[str]:
    common = C.label_noise_overrides(n, epochs, model, ft_epochs)
    ft = [
        f"relabel.epochs={ft_epochs}",
        "relabel.lr=1e-3",
        "relabel.batch_size=128",
        "run.routes=[l_ft,f_ft,relabel,retrain]",
    ]
    return [*common, *ft, *NOISES[noise], f"run.seed={seed}", f"noise.seed={seed}"]


def one_seed(b: C.Bench, over: list[str], work: Path, log) -> dict:
    """Every row of one (noise, seed): the base run, the unpruned routes, the Oracle, Retrain at matched time."""
    base = C.run_pipeline(b.config(over), work / "base", log)
    rep, lay = base.report, base.layout
    init = rep["routes"]["initial"]
    oracle = C.oracle(b.config(over), work / "base", work / "oracle", log)
    executor = LocalExecutor(log)
    shared = {s: lay.stage(s) for s in ("data", "initial", "attribution", "partition")}
    unpruned = RunLayout(str((work / "unpruned").resolve()), shared)
    run_u = pipeline.Run(b.config([*over, "prune.fraction=0"]), unpruned, executor, log)
    run_u.run(["prune", *FINE_TUNE_ROUTES])
    overhead_u = sum(base.run.manifest(s)["seconds"] for s in REPAIR_OVERHEAD if s != "prune")
    overhead_u += run_u.manifest("prune")["seconds"]
    rows: dict[str, dict] = {}
    for route in FINE_TUNE_ROUTES:
        rows[f"{route}/pruned"] = {
            "accuracy": rep["routes"][route]["accuracy"],
            "seconds": rep["routes"][route]["seconds_total"],
        }
        s = run_u.summary(route)
        rows[f"{route}/unpruned"] = {"accuracy": s["accuracy"], "seconds": s["seconds_total"] + overhead_u}
    for name, row in rows.items():  # Retrain on the same detected split, given the route's wall time
        matched = RunLayout(
            str((work / f"retrain_{name.replace('/', '_')}").resolve()),
            {"data": lay.stage("data"), "partition": lay.stage("partition")},
        )
        cfg = b.config([*over, f"retrain.time_budget_s={row['seconds']:.3f}"])
        s = pipeline.Run(cfg, matched, executor, log).run(["retrain"]).summary("retrain")
        row.update(
            retrain_matched=s["accuracy"],
            retrain_matched_seconds=s["seconds_total"],
            retrain_matched_epochs=s["epochs"],
        )
    # the report's evidence, and the noise-corrected score it leaves out, for every route and start
    evidence = val_scores(lay, list(rep["routes"]), corrected=True)
    unpruned_scores = val_scores(unpruned, list(FINE_TUNE_ROUTES), corrected=True)
    evidence.update({f"{r}/unpruned": v for r, v in unpruned_scores.items()})
    test = {"initial": init["accuracy"], "retrain": rep["routes"]["retrain"]["accuracy"]}
    test.update({r: rep["routes"][r]["accuracy"] for r in FINE_TUNE_ROUTES})
    test.update({f"{r}/unpruned": rows[f"{r}/unpruned"]["accuracy"] for r in FINE_TUNE_ROUTES})
    best = max(test, key=test.get)
    # Every rule's pick (the product's is CHOICE_RULE): given labels, given labels corrected by the estimated
    # noise transition, the samples detected as clean.
    by_rule = {}
    for rule in RULES:
        route = recommend_route(evidence, rule)["route"]
        by_rule[rule] = {"route": route, "loss": test[best] - test[route] if route else None}
    return {
        "initial": {k: init[k] for k in ("accuracy", "seconds_total", "epochs", "train_accuracy_given_labels")},
        "oracle": {k: oracle[k] for k in ("accuracy", "wall_seconds", "epochs")},
        "retrain_full": {k: rep["routes"]["retrain"][k] for k in ("accuracy", "seconds_total", "epochs")},
        "rows": rows,
        "choice": {"rule": CHOICE_RULE, **by_rule[CHOICE_RULE], "by_rule": by_rule, "evidence": evidence},
        "test": test,
        "test_best": best,
        "detection": rep["detection"].get("f1"),
        "relabel": rep.get("relabel"),
        "validation_detection": rep.get("validation_detection"),
        "stages_seconds": rep["stages_seconds"],
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray([v for v in values if v is not None], dtype=np.float64)
    return (float(a.mean()), float(a.std())) if len(a) else (float("nan"), float("nan"))


def summarize(per_seed: dict[str, dict]) -> dict:
    """Mean and spread over seeds of every row of one noise setting (gap closed per seed, then averaged)."""
    seeds = list(per_seed.values())
    out: dict = {"rows": {}, "n_seeds": len(seeds)}
    for key in ("initial", "oracle", "retrain_full"):
        out[key] = mean_std([s[key]["accuracy"] for s in seeds])
    out["initial_fit"] = mean_std([s["initial"]["train_accuracy_given_labels"] for s in seeds])
    out["gap_retrain_full"] = mean_std(
        [gap(s["retrain_full"]["accuracy"], s["initial"]["accuracy"], s["oracle"]["accuracy"]) for s in seeds]
    )
    for name in seeds[0]["rows"]:
        rows = [(s["rows"][name], s) for s in seeds]
        out["rows"][name] = {
            "accuracy": mean_std([r["accuracy"] for r, _ in rows]),
            "gap": mean_std([gap(r["accuracy"], s["initial"]["accuracy"], s["oracle"]["accuracy"]) for r, s in rows]),
            "wall_ratio": mean_std([r["seconds"] / s["initial"]["seconds_total"] for r, s in rows]),
            "retrain_matched": mean_std([r["retrain_matched"] for r, _ in rows]),
            "retrain_matched_epochs": mean_std([r["retrain_matched_epochs"] for r, _ in rows]),
            "gap_retrain_matched": mean_std(
                [gap(r["retrain_matched"], s["initial"]["accuracy"], s["oracle"]["accuracy"]) for r, s in rows]
            ),
            "vs_matched": mean_std([r["accuracy"] - r["retrain_matched"] for r, _ in rows]),
        }
    out["choice_loss"] = [s["choice"]["loss"] for s in seeds]
    out["test_best"] = [s["test_best"] for s in seeds]
    out["by_rule"] = {
        rule: {
            "routes": [str(s["choice"]["by_rule"][rule]["route"]) for s in seeds],
            "loss": [s["choice"]["by_rule"][rule]["loss"] for s in seeds],
        }
        for rule in RULES
    }
    # by accuracy: the gap closed means nothing where the Oracle does not beat the Initial
    out["best_route"] = max(out["rows"], key=lambda r: out["rows"][r]["accuracy"][0])
    return out


def pm(v: tuple[float, float], digits: int = 4) -> str:
    return f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"


def render(summary: dict[str, dict]) -> str:
    lines = []
    for noise, s in summary.items():
        lines += [
            f"## {noise} (mean ± std over {s['n_seeds']} seeds)",
            "",
            f"Initial {pm(s['initial'])} (fit of its given labels {pm(s['initial_fit'])}), Oracle {pm(s['oracle'])}, "
            f"Retrain at the Initial's budget {pm(s['retrain_full'])} (gap {pm(s['gap_retrain_full'], 2)}).",
            "",
        ]
        if s["oracle"][0] <= s["initial"][0]:
            lines += ["**The Oracle does not beat the Initial: the gap closed means nothing here.**", ""]
        header = [
            "route",
            "start",
            "accuracy",
            "gap closed",
            "wall / Initial",
            "Retrain same wall",
            "its epochs",
            "its gap",
            "route - it",
        ]
        rows = []
        for name, r in s["rows"].items():
            route, start = name.split("/")
            rows.append(
                [
                    ROUTE_TITLES[route],
                    start,
                    pm(r["accuracy"]),
                    pm(r["gap"], 2),
                    pm(r["wall_ratio"], 3),
                    pm(r["retrain_matched"]),
                    pm(r["retrain_matched_epochs"], 1),
                    pm(r["gap_retrain_matched"], 2),
                    pm(r["vs_matched"]),
                ]
            )
        lines += [C.md_table(header, rows), ""]
        lines += [f"Route recommended without the test split, per seed (test-best: {', '.join(s['test_best'])}):", ""]
        choice_rows = [
            [
                rule + (" (the product's)" if rule == CHOICE_RULE else ""),
                RULES[rule][2],
                ", ".join(r["routes"]),
                ", ".join("-" if v is None else f"{v:.4f}" for v in r["loss"]),
            ]
            for rule, r in s["by_rule"].items()
        ]
        lines += [C.md_table(["rule", "scored on", "picks", "test points lost"], choice_rows), ""]
        acc = {name: r["accuracy"][0] for name, r in s["rows"].items()}
        onoff = [f"{ROUTE_TITLES[r]} {acc[f'{r}/pruned'] - acc[f'{r}/unpruned']:+.4f}" for r in FINE_TUNE_ROUTES]
        lines += [f"Pruning on - off (mean accuracy): {', '.join(onoff)}.", ""]
    return "\n".join(lines)


def goals(summary: dict[str, dict]) -> list[list]:
    rows = []
    for noise, s in summary.items():
        best = s["rows"][s["best_route"]]
        name = s["best_route"]
        rows.append(
            [
                f"{noise}: best route ({name}) closes >= {GOALS[noise]} of the gap",
                pm(best["gap"], 2),
                best["gap"][0] >= GOALS[noise],
            ]
        )
        rows.append(
            [
                f"{noise}: ... at <= {MAX_WALL_RATIO}x the Initial's wall time",
                pm(best["wall_ratio"], 3),
                best["wall_ratio"][0] <= MAX_WALL_RATIO,
            ]
        )
        rows.append(
            [
                f"{noise}: ... beats Retrain at matched wall time by >= 1 point",
                pm(best["vs_matched"]),
                best["vs_matched"][0] >= MIN_LEAD,
            ]
        )
        worst = max((v for v in s["choice_loss"] if v is not None), default=float("nan"))
        rows.append(
            [
                f"{noise}: recommended_route ({CHOICE_RULE} rule) within 0.5 point of the test-best, every seed",
                f"worst {worst:.4f}",
                worst <= MAX_CHOICE_LOSS,
            ]
        )
        rows.append(
            [f"{noise}: Initial fits >= 95% of its given labels", pm(s["initial_fit"]), s["initial_fit"][0] >= MIN_FIT]
        )
    return rows


def add_run_options(parser) -> None:
    """The settings of a matched_budget run (`overrides`), also taken by the scripts that read its runs."""
    parser.add_argument("--seeds", default="0,1,2", help="run.seed = noise.seed, one Initial each")
    parser.add_argument("--noises", default=",".join(NOISES))
    parser.add_argument("--n", type=int, default=20000, help="training samples (a subset)")
    parser.add_argument("--initial-epochs", type=int, default=80, help="Initial, Retrain (full) and Oracle epochs")
    parser.add_argument("--ft-epochs", type=int, default=10, help="L-FT, F-FT and Relabel epochs (Adam lr 1e-3)")
    parser.add_argument("--model", default="cnn_small")


def main() -> None:
    parser = C.parser(__doc__)
    add_run_options(parser)
    parser.add_argument("--reuse", action="store_true", help="keep finished stages (the trained Initials) under --runs")
    parser.add_argument(
        "--merge",
        default="",
        help="comma-separated results .json of earlier runs (e.g. one seed each): summarize their seeds, run nothing",
    )
    args = parser.parse_args()
    b = C.Bench.start("matched_budget", args)
    if args.merge:
        return merge(b, [Path(p) for p in args.merge.split(",")])
    if b.quick:
        n, epochs, ft_epochs, model, noises, seeds = 600, 4, 2, "mlp", ["sym40"], [0]
    else:
        n, epochs, ft_epochs, model = args.n, args.initial_epochs, args.ft_epochs, args.model
        noises, seeds = args.noises.split(","), [int(s) for s in args.seeds.split(",")]
    params = {
        "train_samples": n,
        "model": model,
        "initial/retrain/oracle": f"Adam lr 1e-3, batch 64, {epochs} epochs",
        "l_ft/f_ft/relabel": f"Adam lr 1e-3, batch 128, {ft_epochs} epochs",
        "retrain_matched": "retrain.time_budget_s = the route's wall seconds (of training; at most the full epochs)",
        "seeds": seeds,
        "noises": noises,
        "torch_threads": args.threads,
    }
    per_noise: dict[str, dict] = {}
    for noise in noises:
        per_seed = {}
        for seed in seeds:
            print(f"== {noise} seed {seed}", C.loadavg(), flush=True)
            work = b.runs(noise, f"seed{seed}")
            if args.reuse:
                work.mkdir(parents=True, exist_ok=True)
            else:
                C.fresh_dir(work)  # before the log opens: emptied after, its log would be written to no file
            log = C.log_to(work / "log.txt")
            per_seed[seed] = one_seed(b, overrides(n, epochs, model, ft_epochs, noise, seed), work, log)
        per_noise[noise] = per_seed
    summary = {noise: summarize(per_seed) for noise, per_seed in per_noise.items()}
    body = "\n".join(C.goals_md(goals(summary))) + "\n\n" + render(summary)
    b.write("Repair against Retrain at the same cost", body, {"summary": summary, "per_seed": per_noise}, params)


def merge(b: C.Bench, sources: list[Path]) -> None:
    """One table from the per-seed results of several runs of this script (same settings but the seeds)."""
    per_noise: dict[str, dict] = {}
    loaded = [json.loads(p.read_text()) for p in sources]
    for data in loaded:
        for noise, per_seed in data["per_seed"].items():
            per_noise.setdefault(noise, {}).update(per_seed)
    params = {**loaded[0]["meta"]["params"], "noises": list(per_noise)}
    params["seeds"] = {noise: sorted(int(s) for s in per_seed) for noise, per_seed in per_noise.items()}
    params["merged_from"] = [d["meta"]["command"] + f" (finished {d['meta']['finished_at']})" for d in loaded]
    summary = {noise: summarize(per_seed) for noise, per_seed in per_noise.items()}
    body = "\n".join(C.goals_md(goals(summary))) + "\n\n" + render(summary)
    b.write("Repair against Retrain at the same cost", body, {"summary": summary, "per_seed": per_noise}, params)


if __name__ == "__main__":
    main()
