"""Label noise on Fashion-MNIST: symmetric 20 / 40 / 60% and asymmetric (class-pair) 40%, the Initial
model trained until it fits its noisy labels; every detection rule raypipe has, the repair routes,
and the gap each closes towards the Oracle (a fresh model on the truly clean samples).

Per noise setting, one base run (detection.signal=auto, which needs the training trajectory, so it
trains the Initial model) and variants that reuse its stages:
- detection.signal=trajectory: data, initial (with its trajectory) and attribution copied, skipped;
- detection.signal=knn and detection.signal=attribution with attribution.rule in
  {grad_x_act_maxclass, grad_x_act_label, loss}: data copied (skipped), the base's Initial model
  given as model.checkpoint (so the same model is repaired; no retraining).

gap closed = (repaired accuracy - Initial) / (Oracle - Initial), clean test split, last epoch.

Fine-tuning follows the paper: Adam lr 1e-3 for L-FT and F-FT (docs/method.md), here for 10 epochs
(1/8 of the Initial's 80; the paper ran 30 of 60). A second table per noise setting, on the auto
partition, repeats F-FT over 3 training seeds for 5 / 10 / 20 / 40 epochs, from the pruned model
and from the unpruned Initial (prune.fraction=0): what the epoch budget buys and what pruning adds.

    .venv/bin/python bench/label_noise.py [--quick] [--n 4000] [--epochs 80] [--noises sym40,...] [--merge]
        [--results DIR] [--runs DIR]
"""

from __future__ import annotations

import json
from pathlib import Path

import common as C

from raypipe import pipeline
from raypipe.executors import LocalExecutor
from raypipe.layout import RunLayout

NOISES = {
    "sym20": ["noise.kind=symmetric", "noise.rate=0.2"],
    "sym40": ["noise.kind=symmetric", "noise.rate=0.4"],
    "sym60": ["noise.kind=symmetric", "noise.rate=0.6"],
    "asym40": ["noise.kind=asymmetric", "noise.rate=0.4", "noise.pairs=dataset"],
}
# (row name, overrides, how it shares the base run, routes)
VARIANTS = [
    ("trajectory", ["detection.signal=trajectory"], ("data", "initial", "attribution"), False),
    ("knn", ["detection.signal=knn"], ("data",), True),
    (
        "attr:grad_x_act_maxclass",
        ["detection.signal=attribution", "attribution.rule=grad_x_act_maxclass"],
        ("data",),
        True,
    ),
    ("attr:grad_x_act_label", ["detection.signal=attribution", "attribution.rule=grad_x_act_label"], ("data",), True),
    ("attr:loss", ["detection.signal=attribution", "attribution.rule=loss"], ("data",), True),
]
WITH_RETRAIN = {"auto", "knn"}
CURVE_EPOCHS = (5, 10, 20, 40)
CURVE_SEEDS = (0, 1, 2)  # Retrain (at the Initial's epoch budget) is run for these rows only (time)


gap = C.gap


def main() -> None:
    parser = C.parser(__doc__)
    parser.add_argument("--n", type=int, default=4000, help="training samples (a subset)")
    parser.add_argument("--epochs", type=int, default=80, help="Initial and Retrain epochs")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--ft-epochs", type=int, default=10, help="L-FT and F-FT epochs (Adam lr 1e-3, the paper's)")
    parser.add_argument("--noises", default=",".join(NOISES))
    parser.add_argument("--merge", action="store_true", help="keep other noise settings from an earlier results file")
    args = parser.parse_args()
    b = C.Bench.start("label_noise", args)
    if b.quick:
        n, epochs, ft_epochs, noises = 1000, 3, 1, ["sym40"]
        variants = [v for v in VARIANTS if v[0] in ("knn", "attr:loss")]
    else:
        n, epochs, ft_epochs, noises, variants = args.n, args.epochs, args.ft_epochs, args.noises.split(","), VARIANTS
    common = C.label_noise_overrides(n, epochs, args.model, ft_epochs)
    epochs_list, seeds = ((1, 2), (0, 1)) if b.quick else (CURVE_EPOCHS, CURVE_SEEDS)
    params = {
        "train_samples": n,
        "model": args.model,
        "initial/retrain/oracle": f"Adam lr 1e-3, batch 64, {epochs} epochs",
        "l_ft": f"Adam lr 1e-3, batch 128, {ft_epochs} epochs",
        "f_ft": f"Adam lr 1e-3, batch 128, {ft_epochs} epochs",
        "f_ft_curve": f"auto partition, epochs {list(epochs_list)} x seeds {list(seeds)}, pruned and unpruned",
        "prune.fraction": 0.156,
        "partition.tau": 0.5,
        "detection": "k=30, class_balanced, decision=mixture (defaults)",
        "seeds": "run.seed=0, noise.seed=0, data.split_seed=0",
        "torch_threads": args.threads,
        "retrain_rows": sorted(WITH_RETRAIN),
    }
    out: dict[str, dict] = {}
    for noise in noises:
        base_dir = C.fresh_dir(b.runs(noise, "auto"))
        log = C.log_to(base_dir.parent / "log.txt")
        print(f"== {noise}: base run (auto)", C.loadavg(), flush=True)
        base_over = [*common, *NOISES[noise]]
        base = C.run_pipeline(
            b.config([*base_over, "detection.signal=auto", "run.routes=[l_ft,f_ft,retrain]"]), base_dir, log
        )
        orc = C.oracle(b.config(base_over), base_dir, base_dir.parent / "oracle", log)
        init = base.report["routes"]["initial"]
        print(f"== {noise}: F-FT curve", C.loadavg(), flush=True)
        curve = fine_tune_curve(b, base_over, base.layout, base_dir.parent / "ft_curve", epochs_list, seeds, log)
        rows = {"auto": base}
        for name, over, share, ckpt in variants:
            print(f"== {noise}: {name}", C.loadavg(), flush=True)
            routes = "[l_ft,f_ft,retrain]" if name in WITH_RETRAIN else "[l_ft,f_ft]"
            rows[name] = b.run_variant(
                base_dir,
                base_dir.parent / name.replace(":", "_"),
                [*base_over, *over, f"run.routes={routes}"],
                log,
                share,
                ckpt,
            )
        retrain_s = base.report["routes"]["retrain"]["seconds_total"]
        res = {
            "initial": init,
            "oracle": orc,
            "rows": {},
            "retrain_seconds_auto": retrain_s,
            "epochs": epochs,
            "n_corrupted": base.report["data"]["n_corrupted"],
            "n_train": base.report["data"]["rows"]["train"],
            "f_ft_curve": curve,
        }
        for name, done in rows.items():
            rep = done.report
            det = rep.get("detection", {})
            rt = rep["routes"]
            res["rows"][name] = {
                "precision": det.get("precision"),
                "recall": det.get("recall"),
                "f1": det.get("f1"),
                "auroc": det.get("auroc"),
                "n_flagged": det.get("n_flagged"),
                "n_corrupted": det.get("n_corrupted"),
                "auroc_by_signal": det.get("auroc_by_signal"),
                "signals_used": det.get("signals_used"),
                "l_ft": rt["l_ft"]["accuracy"],
                "f_ft": rt["f_ft"]["accuracy"],
                "retrain": rt.get("retrain", {}).get("accuracy"),
                "gap_l_ft": gap(rt["l_ft"]["accuracy"], init["accuracy"], orc["accuracy"]),
                "gap_f_ft": gap(rt["f_ft"]["accuracy"], init["accuracy"], orc["accuracy"]),
                "gap_retrain": gap(rt["retrain"]["accuracy"], init["accuracy"], orc["accuracy"])
                if "retrain" in rt
                else None,
                "repair_seconds_f_ft": rt["f_ft"]["seconds_total"],
                "repair_seconds_l_ft": rt["l_ft"]["seconds_total"],
                "retrain_seconds": rt.get("retrain", {}).get("seconds_total"),
                "stages_seconds": rep["stages_seconds"],
                "stages_cpu_seconds": done.cpu_seconds,
                "stages_skipped": done.skipped,
            }
        out[noise] = res
        merged = dict(out)
        prev = args.results / f"{b.result_name}.json"
        if args.merge and prev.exists():  # keep the noise settings an earlier invocation measured
            old = json.loads(prev.read_text())
            merged = {**old.get("results", {}), **out}
            params["merged_from_earlier_invocation"] = sorted(set(old.get("results", {})) - set(out))
        ordered = {k: merged[k] for k in NOISES if k in merged}
        b.write(
            "Label noise: detection and repair", _goals_md(ordered) + _render(ordered), {"results": ordered}, params
        )


def fine_tune_curve(b: C.Bench, base_over: list[str], base: RunLayout, work: Path, epochs_list, seeds, log) -> dict:
    """F-FT on the base (auto) partition for several epoch budgets and seeds, from the pruned model
    and from the unpruned Initial: {"pruned"|"unpruned": {epochs: [accuracy per seed]}}.

    Each point is the pipeline's own f_ft stage, in a run under `work` whose data, initial model,
    attribution and partition are the base run's folders: `pruned` shares the base's pruned model too;
    `unpruned` runs the prune stage with prune.fraction=0 (once: it prunes nothing)."""
    C.fresh_dir(work)
    executor = LocalExecutor(log)
    shared = {stage: base.stage(stage) for stage in ("data", "initial", "attribution", "partition")}
    starts = {
        "pruned": (RunLayout(str(work / "pruned"), {**shared, "prune": base.stage("prune")}), ["f_ft"], []),
        "unpruned": (RunLayout(str(work / "unpruned"), shared), ["prune", "f_ft"], ["prune.fraction=0"]),
    }
    out: dict = {}
    for name, (lay, stages, extra) in starts.items():
        out[name] = {}
        for epochs in epochs_list:
            accs = []
            for seed in seeds:
                cfg = b.config([*base_over, *extra, f"run.seed={seed}", f"f_ft.epochs={epochs}"])
                accs.append(pipeline.Run(cfg, lay, executor, log).run(stages).summary("f_ft")["accuracy"])
            out[name][epochs] = accs
            log(f"[ft curve] {name} {epochs} epochs: {accs}")
    return out


def _curve_md(res: dict) -> list[str]:
    import numpy as np

    curve = res.get("f_ft_curve")
    if not curve:
        return []
    init, orc = res["initial"]["accuracy"], res["oracle"]["accuracy"]
    epochs = list(next(iter(curve.values())))
    rows = []
    for name, by_epochs in curve.items():
        cells = []
        for e in epochs:
            a = np.asarray(by_epochs[e])
            cells.append(f"{a.mean():.4f} ± {a.std():.4f} (gap {gap(float(a.mean()), init, orc):.2f})")
        rows.append([name, *cells])
    n_seeds = len(next(iter(next(iter(curve.values())).values())))
    return [
        f"F-FT on the auto partition by epochs (mean ± std over {n_seeds} training seeds; gap closed towards "
        "the Oracle): `pruned` starts from the pruned model (prune.fraction=0.156), `unpruned` from the "
        "Initial (prune.fraction=0).",
        "",
        C.md_table(["start", *[f"{e} epochs" for e in epochs]], rows),
        "",
    ]


def _cpu_ratio(cpu: dict, cpu_auto: dict) -> str:
    """Repair (attribution + partition + prune + fine-tuning) over Retrain, in this process's CPU seconds."""
    if "retrain" not in cpu_auto or "l_ft" not in cpu:
        return "—"
    over = C.overhead_seconds(cpu)
    return f"{(over + cpu['l_ft']) / cpu_auto['retrain']:.2f} / {(over + cpu['f_ft']) / cpu_auto['retrain']:.2f}"


def _render(out: dict) -> str:
    md = []
    for noise, res in out.items():
        init, orc = res["initial"], res["oracle"]
        retrain_s = res["retrain_seconds_auto"]
        cpu_auto = res["rows"]["auto"].get("stages_cpu_seconds") or {}
        table = []
        for name, row in res["rows"].items():
            table.append(
                [
                    name,
                    row["precision"],
                    row["recall"],
                    row["f1"],
                    row["auroc"],
                    row["l_ft"],
                    row["f_ft"],
                    row["retrain"],
                    row["gap_l_ft"],
                    row["gap_f_ft"],
                    row["gap_retrain"],
                    f"{row['repair_seconds_l_ft']:.1f} / {row['repair_seconds_f_ft']:.1f}",
                    f"{row['repair_seconds_l_ft'] / retrain_s:.2f} / {row['repair_seconds_f_ft'] / retrain_s:.2f}",
                    _cpu_ratio(row.get("stages_cpu_seconds") or {}, cpu_auto),
                ]
            )
        md += [
            f"## {noise}",
            "",
            f"Initial: test accuracy {init['accuracy']:.4f}, training accuracy on the given labels "
            f"{init.get('train_accuracy_given_labels', float('nan')):.3f} after {res['epochs']} epochs "
            f"({init['seconds_total']:.1f} s). "
            f"Oracle (fresh model, {orc['n_train']} truly clean samples, same recipe): "
            f"{orc['accuracy']:.4f}. Corrupted: {res['n_corrupted']} of {res['n_train']}. "
            f"Retrain (auto split, {res['epochs']} epochs, the Initial's budget): {retrain_s:.1f} s.",
            "",
            C.md_table(
                [
                    "detector",
                    "precision",
                    "recall",
                    "F1",
                    "AUROC",
                    "L-FT acc",
                    "F-FT acc",
                    "Retrain acc",
                    "gap L-FT",
                    "gap F-FT",
                    "gap Retrain",
                    "repair s L-FT / F-FT route",
                    "repair / Retrain(auto) time L-FT / F-FT",
                    "same, CPU seconds",
                ],
                table,
                3,
            ),
            "",
            "AUROC of each signal alone (auto row): "
            + ", ".join(f"{k} {v:.3f}" for k, v in (res["rows"]["auto"].get("auroc_by_signal") or {}).items()),
            "",
            *_curve_md(res),
            "",
        ]
    return "\n".join(md)


def _goals_md(out: dict) -> str:
    lines = []
    if "sym40" in out:
        r = out["sym40"]
        init, orc = r["initial"]["accuracy"], r["oracle"]["accuracy"]
        best = max(r["rows"].items(), key=lambda kv: max(kv[1]["f_ft"], kv[1]["l_ft"]))
        best_f1 = max(r["rows"].items(), key=lambda kv: kv[1]["f1"] or 0)
        auto = r["rows"]["auto"]
        lines += [
            *C.goals_md(
                [
                    [
                        "F-FT gap closed >= 0.8 and accuracy >= Initial + 5 points",
                        f"best row `{best[0]}`: F-FT gap {best[1]['gap_f_ft']:.2f}, "
                        f"accuracy {best[1]['f_ft']:.4f} vs Initial "
                        f"{init:.4f} ({100 * (best[1]['f_ft'] - init):+.1f} points), Oracle {orc:.4f}; "
                        f"(L-FT: gap {best[1]['gap_l_ft']:.2f}, {best[1]['l_ft']:.4f})",
                        best[1]["gap_f_ft"] >= 0.8 and best[1]["f_ft"] >= init + 0.05,
                    ],
                    [
                        "detection F1 >= 0.90 with the best rule",
                        f"best `{best_f1[0]}`: F1 {best_f1[1]['f1']:.3f}",
                        (best_f1[1]["f1"] or 0) >= 0.90,
                    ],
                    [
                        "whole repair (attribution + partition + prune + F-FT) <= 0.35 x Retrain wall time",
                        f"auto row: {auto['repair_seconds_f_ft']:.1f} s / {r['retrain_seconds_auto']:.1f} s = "
                        f"{auto['repair_seconds_f_ft'] / r['retrain_seconds_auto']:.2f}",
                        auto["repair_seconds_f_ft"] <= 0.35 * r["retrain_seconds_auto"],
                    ],
                ],
                "Against the goals (sym 40%)",
            ),
            "",
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
