"""The same pipeline in one process (run.executor=local) vs on local Ray (run.executor=ray), on a
Fashion-MNIST subset: wall time per stage and in total, the Ray / local
ratio (goal: Ray <= 1.15x in-process), attribution samples per second in each, driver peak memory.

Each executor runs in a fresh subprocess (so each driver's peak RSS, VmHWM, is its own), one after
the other; with --abba the order local, ray, ray, local is run and each executor's times averaged,
which cancels a linear drift of the machine's load. Ray's start-up (ray.init, workers) is part of
the `total` wall time and shown on its own row (`executor start`).

    .venv/bin/python bench/ray_vs_local.py [--quick] [--n 4000] [--epochs 2] [--abba] [--results DIR] [--runs DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import common as C

from raypipe import pipeline
from raypipe.config import ROUTE_TITLES

EXECUTORS = ("local", "ray")


def child(args) -> None:
    """One executor's whole run in this (fresh) process; prints its RESULT line."""
    C.set_threads(args.threads)
    from raypipe.api import make_executor
    from raypipe.report.report import write_report

    cfg = C.config(json.loads(args.overrides), args.data)
    out = C.fresh_dir(Path(args.out))
    log = C.log_to(out.parent / f"log_{cfg.run.executor}.txt")
    load0 = C.loadavg()
    t0 = time.perf_counter()
    executor = make_executor(cfg, log)
    start_s = time.perf_counter() - t0
    try:
        run = pipeline.run(cfg, str(out), executor, None, log)
    finally:
        executor.close()
    report = write_report(run.layout, cfg, run.manifests, log)
    total = time.perf_counter() - t0
    C.child_result(
        {
            "executor": cfg.run.executor,
            "total_seconds": total,
            "executor_start_seconds": start_s,
            "stages_ran": run.ran,
            "stages_seconds": report["stages_seconds"],
            "driver_peak_rss_mib": C.peak_rss_mib(),
            "rows": run.summary("data")["rows"]["train"],
            "loadavg": [load0, C.loadavg()],
            "accuracy": {r: m["accuracy"] for r, m in report["routes"].items()},
            "detection_f1": report.get("detection", {}).get("f1"),
        }
    )


def main() -> None:
    parser = C.parser(__doc__)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=2, help="Initial and Retrain epochs (fine-tuning: 1)")
    parser.add_argument("--abba", action="store_true", help="run local, ray, ray, local and average each")
    args = parser.parse_args()
    if args.child:
        return child(args)
    name = "ray_vs_local"
    if not args.quick and (args.n, args.epochs) != (4000, 2):  # a larger run kept apart
        name = f"ray_vs_local_n{args.n}_e{args.epochs}"
    b = C.Bench.start(name, args)
    if b.quick:  # each Ray Train route pays ~25 s of start-up on 2 CPUs: Ray Train, Data and tasks once each
        n, model, ep, ft, routes = 1000, "mlp", 1, 1, "[]"
    else:
        n, model, ep, ft, routes = args.n, "cnn_small", args.epochs, 1, "[l_ft,f_ft,retrain]"
    overrides = [
        f"data.max_train_samples={n}",
        "data.shard_rows=1024",
        f"model.name={model}",
        f"initial.epochs={ep}",
        f"retrain.epochs={ep}",
        f"l_ft.epochs={ft}",
        f"f_ft.epochs={ft}",
        f"run.routes={routes}",
        "ray.address=local",  # a Ray of its own, even when another one runs on this machine
    ]
    order = ["local", "ray", "ray", "local"] if args.abba else ["local", "ray"]
    runs = []
    for i, ex in enumerate(order):
        print(f"== {ex} ({i + 1}/{len(order)})", C.loadavg(), flush=True)
        res = C.run_child(
            __file__,
            [
                *("--threads", str(args.threads), "--out", str(b.runs(f"{i}_{ex}")), "--data", b.data),
                *("--overrides", json.dumps([*overrides, f"run.executor={ex}"])),
            ],
        )
        if "error" in res:
            raise SystemExit(f"{ex} run failed")
        runs.append(res)
        print(
            "   ",
            {k: runs[-1][k] for k in ("total_seconds", "executor_start_seconds", "driver_peak_rss_mib")},
            flush=True,
        )

    def mean(ex: str, get) -> float:
        vals = [get(r) for r in runs if r["executor"] == ex]
        return sum(vals) / len(vals)

    def accuracy(route: str):
        return lambda r: r["accuracy"][route]

    rows, ratios = [], {}
    for stage in [s for s in pipeline.STAGE_NAMES if s in runs[0]["stages_seconds"]]:
        lo = mean("local", lambda r, s=stage: r["stages_seconds"].get(s, 0.0))
        ra = mean("ray", lambda r, s=stage: r["stages_seconds"].get(s, 0.0))
        ratios[stage] = ra / lo if lo else float("nan")
        rows.append([stage, f"{lo:.1f}", f"{ra:.1f}", f"{ratios[stage]:.2f}"])
    lo_start = mean("local", lambda r: r["executor_start_seconds"])
    ra_start = mean("ray", lambda r: r["executor_start_seconds"])
    rows.append(["executor start (ray.init)", f"{lo_start:.1f}", f"{ra_start:.1f}", "—"])
    lo_t, ra_t = mean("local", lambda r: r["total_seconds"]), mean("ray", lambda r: r["total_seconds"])
    ratios["total"] = ra_t / lo_t
    rows.append(["**total wall**", f"{lo_t:.1f}", f"{ra_t:.1f}", f"{ratios['total']:.2f}"])
    attr_rate = {ex: mean(ex, lambda r: r["rows"] / r["stages_seconds"]["attribution"]) for ex in EXECUTORS}
    mem = {ex: mean(ex, lambda r: r["driver_peak_rss_mib"]) for ex in EXECUTORS}
    body = "\n".join(
        [
            f"Order of runs: {', '.join(order)} (each in a fresh subprocess).",
            "",
            C.md_table(["stage", "local s", "ray s", "ray / local"], rows),
            "",
            C.md_table(
                ["", "local", "ray"],
                [
                    ["attribution samples / s", f"{attr_rate['local']:.0f}", f"{attr_rate['ray']:.0f}"],
                    ["driver peak RSS MiB (VmHWM)", f"{mem['local']:.0f}", f"{mem['ray']:.0f}"],
                    *[
                        [f"test accuracy {ROUTE_TITLES[r]}", *[f"{mean(ex, accuracy(r)):.4f}" for ex in EXECUTORS]]
                        for r in runs[0]["accuracy"]
                    ],
                    [
                        "load average per run",
                        *[str([r["loadavg"] for r in runs if r["executor"] == ex]) for ex in EXECUTORS],
                    ],
                ],
            ),
            "",
            *C.goals_md(
                [
                    [
                        "Ray <= 1.15x in-process (total wall)",
                        f"{ratios['total']:.2f}x ({ra_t:.1f} s vs {lo_t:.1f} s); "
                        f"without Ray's start-up {(ra_t - ra_start) / (lo_t - lo_start):.2f}x",
                        ratios["total"] <= 1.15,
                    ]
                ],
            ),
        ]
    )
    b.write(
        "Ray vs in-process",
        body,
        {"runs": runs, "ratios": ratios, "attribution_samples_per_s": attr_rate, "driver_peak_rss_mib": mem},
        {
            "train_samples": n,
            "model": model,
            "initial/retrain epochs": ep,
            "l_ft/f_ft epochs": ft,
            "routes": routes,
            "shard_rows": 1024,
            "detection.signal": "auto (default)",
            "torch_threads (local, driver)": args.threads,
            "order": order,
            "seeds": "run.seed=0, noise.seed=0, data.split_seed=0",
        },
    )


if __name__ == "__main__":
    main()
