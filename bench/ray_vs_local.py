"""Issue 3's benchmark: the same pipeline in one process (run.executor=local) vs on local Ray
(run.executor=ray), on a Fashion-MNIST subset: wall time per stage and in total, the Ray / local
ratio (goal: Ray <= 1.15x in-process), attribution samples per second in each, driver peak memory.

Each executor runs in a fresh subprocess (so each driver's peak RSS, VmHWM, is its own), one after
the other; with --abba the order local, ray, ray, local is run and each executor's times averaged,
which cancels a linear drift of the machine's load. Ray's start-up (ray.init, workers) is part of
the `total` wall time and shown on its own row (`executor start`).

    .venv/bin/python bench/ray_vs_local.py [--quick] [--n 4000] [--epochs 2] [--abba]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import common as C

STAGES = ("data", "initial", "attribution", "partition", "prune", "l_ft", "f_ft", "retrain")


def vmhwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(args) -> None:
    C.set_threads(args.threads)
    from raypipe import api, pipeline

    cfg = C.config(json.loads(args.overrides))
    out = C.fresh_dir(Path(args.out))
    log = C.log_to(out.parent / f"log_{cfg.run.executor}.txt")
    load0 = C.loadavg()
    t0 = time.perf_counter()
    executor = api.make_executor(cfg, log)
    start_s = time.perf_counter() - t0
    try:
        report = pipeline.run(cfg, str(out), executor, None, log)
    finally:
        executor.close()
    total = time.perf_counter() - t0
    res = {
        "executor": cfg.run.executor,
        "total_seconds": total,
        "executor_start_seconds": start_s,
        "stages_seconds": report["stages_seconds"],
        "driver_peak_rss_mib": vmhwm_mib(),
        "rows": report["data"]["rows"]["train"],
        "loadavg": [load0, C.loadavg()],
        "accuracy": {r: m["accuracy"] for r, m in report["routes"].items()},
        "detection_f1": report.get("detection", {}).get("f1"),
    }
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    parser = C.quick_flag()
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--overrides")
    parser.add_argument("--out")
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=2, help="Initial and Retrain epochs (fine-tuning: 1)")
    parser.add_argument("--abba", action="store_true")
    args = parser.parse_args()
    if args.child:
        return child(args)
    started, load_start = time.perf_counter(), C.loadavg()
    C.ensure_fashion_mnist()
    if args.quick:
        n, model, ep, ft = 1000, "mlp", 1, 1
    else:
        n, model, ep, ft = args.n, "cnn_small", args.epochs, 1
    overrides = [
        f"data.max_train_samples={n}",
        "data.shard_rows=1024",
        f"model.name={model}",
        f"initial.epochs={ep}",
        f"retrain.epochs={ep}",
        f"l_ft.epochs={ft}",
        f"f_ft.epochs={ft}",
        "run.routes=[l_ft,f_ft,retrain]",
    ]
    order = ["local", "ray", "ray", "local"] if args.abba else ["local", "ray"]
    runs = []
    for i, ex in enumerate(order):
        print(f"== {ex} ({i + 1}/{len(order)})", C.loadavg(), flush=True)
        out = C.RUNS / ("ray_vs_local_quick" if args.quick else "ray_vs_local") / f"{i}_{ex}"
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "--threads",
            str(args.threads),
            "--out",
            str(out),
            "--overrides",
            json.dumps([*overrides, f"run.executor={ex}"]),
        ]
        p = subprocess.run(
            cmd, capture_output=True, text=True, cwd=C.ROOT, env={**os.environ, "PYTHONPATH": str(C.ROOT)}
        )
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode != 0 or not line:
            print(p.stdout[-3000:], p.stderr[-5000:])
            raise SystemExit(f"{ex} run failed")
        runs.append(json.loads(line[0][7:]))
        print(
            "   ",
            {k: runs[-1][k] for k in ("total_seconds", "executor_start_seconds", "driver_peak_rss_mib")},
            flush=True,
        )

    def mean(ex: str, get) -> float:
        vals = [get(r) for r in runs if r["executor"] == ex]
        return sum(vals) / len(vals)

    rows, ratios = [], {}
    for stage in STAGES:
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
    attr_rate = {ex: mean(ex, lambda r: r["rows"] / r["stages_seconds"]["attribution"]) for ex in ("local", "ray")}
    mem = {ex: mean(ex, lambda r: r["driver_peak_rss_mib"]) for ex in ("local", "ray")}
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
                    [
                        "test accuracy F-FT",
                        *[
                            f"{mean(ex, lambda r: r['accuracy'].get('f_ft', float('nan'))):.4f}"
                            for ex in ("local", "ray")
                        ],
                    ],
                    [
                        "load average per run",
                        *[str([r["loadavg"] for r in runs if r["executor"] == ex]) for ex in ("local", "ray")],
                    ],
                ],
            ),
            "",
            "## Against the goal",
            "",
            C.md_table(
                ["goal", "measured", "met"],
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
    C.write_results(
        "ray_vs_local"
        + ("_quick" if args.quick else "" if (n, ep) == (4000, 2) else f"_n{n}_e{ep}"),  # a larger run kept apart
        "Ray vs in-process",
        body,
        {"runs": runs, "ratios": ratios, "attribution_samples_per_s": attr_rate, "driver_peak_rss_mib": mem},
        {
            "train_samples": n,
            "model": model,
            "initial/retrain epochs": ep,
            "l_ft/f_ft epochs": ft,
            "shard_rows": 1024,
            "detection.signal": "auto (default)",
            "torch_threads (local, driver)": args.threads,
            "order": order,
            "seeds": "run.seed=0, noise.seed=0, data.split_seed=0",
        },
        started,
        load_start,
    )


if __name__ == "__main__":
    main()
