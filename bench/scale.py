"""Driver memory and wall time of the partition and prune stages as the number of samples grows 10x.

Real attribution shards (probe activations and 256-wide attributions of a Fashion-MNIST run) are
replicated to N rows (new sample ids, a small seeded jitter so no two rows are identical) for two
sizes 10x apart. Each (size, executor, setting) runs in a fresh subprocess that measures:
- the process's peak RSS (VmHWM of /proc/self/status) after imports + executor start (baseline),
  after the partition stage and after the prune stage;
- tracemalloc's peak of Python/numpy allocations during each stage (torch's are not traced);
- each stage's wall time and the load average around it.

Settings: `attribution` (detection.signal=attribution: the paper's path, the mixture fitted on a
uniform sample of at most partition.max_fit_rows rows) and `auto` (the default: attribution mixture,
loss and kNN label agreement against a reference set of at most detection.max_reference rows,
combined without ground truth). Both caps are 20k by default, so from 20k rows up the driver holds
the same fit sample and reference set and only O(N) scalars (p_noisy, labels) grow.

    .venv/bin/python bench/scale.py [--quick] [--sizes 20000,200000] [--executors local,ray]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import common as C
import numpy as np

SETTINGS = {
    "attribution": ["detection.signal=attribution"],
    "auto": ["detection.signal=auto"],
}


def source_run(quick: bool) -> Path:
    """A run whose attribution shards (probe [256], attribution [256]) and model are replicated."""
    for cand in [C.RUNS / "scale_src", C.RUNS / "label_noise" / "sym40" / "attr_grad_x_act_label"]:
        if (cand / "attribution" / "_manifest.json").exists() and (cand / "initial" / "model.pt").exists():
            return cand
    out = C.fresh_dir(C.RUNS / "scale_src")
    cfg = C.config(
        [
            "data.max_train_samples=2000",
            "model.name=mlp",
            "initial.epochs=3",
            "attribution.rule=grad_x_act_label",
            "detection.signal=attribution",
            "run.routes=[]",
            "run.executor=local",
        ]
    )
    C.run_pipeline(cfg, out, C.log_to(out / "log.txt"))
    return out


def replicate(src: Path, rows: int, out: Path, shard_rows: int = 2048) -> Path:
    import pyarrow as pa

    from raypipe import storage
    from raypipe.tables import columns_from_table, table_from_columns

    attr_dir = out / "attribution"
    if (attr_dir / "_rows.json").exists() and json.loads((attr_dir / "_rows.json").read_text())["rows"] == rows:
        return attr_dir
    C.fresh_dir(attr_dir)
    tables = [storage.read_table(u) for u in storage.list_files(str(src / "attribution"), ".parquet")]
    base = columns_from_table(pa.concat_tables(tables))
    n0 = len(base["sample_id"])
    stride = int(base["sample_id"].max()) + 1
    rng = np.random.default_rng(0)
    written, shard = 0, 0
    while written < rows:
        take = min(shard_rows, rows - written)
        pos = (np.arange(written, written + take)) % n0
        rep = (np.arange(written, written + take)) // n0
        cols = {k: v[pos].copy() for k, v in base.items()}
        cols["sample_id"] = base["sample_id"][pos] + rep * stride
        for k in ("probe", "attribution"):
            if rep.max() > 0:
                cols[k] = (cols[k] * (1 + 0.01 * rng.standard_normal(cols[k].shape))).astype(np.float32)
        storage.write_table(str(attr_dir / f"part-{shard:05d}.parquet"), table_from_columns(cols))
        written += take
        shard += 1
    (attr_dir / "_rows.json").write_text(json.dumps({"rows": rows, "shards": shard, "source": str(src)}))
    return attr_dir


def child(args) -> None:
    """One measurement in this (fresh) process; prints one JSON line."""
    import tracemalloc

    C.set_threads(args.threads)

    def rss_mib() -> float:
        """Peak RSS of this process's memory image (VmHWM: reset by exec, unlike getrusage's ru_maxrss,
        which Linux carries over from the parent that forked us)."""
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM in /proc/self/status")

    from raypipe import api
    from raypipe.stages import partition, prune

    work = Path(args.workdir)
    overrides = [*SETTINGS[args.setting], f"run.executor={args.executor}", "model.name=mlp"]
    cfg = C.config(overrides)
    log = C.log_to(work / f"log_{args.setting}_{args.executor}.txt")
    executor = api.make_executor(cfg, log)
    # Warm the executor (Ray: start the workers) so the stages measure the work, not the start-up.
    executor.map(lambda i: i, list(range(4)), "warm-up")
    res = {"rows": args.rows, "executor": args.executor, "setting": args.setting, "rss_baseline_mib": rss_mib()}
    out = work / f"out_{args.setting}_{args.executor}"
    C.fresh_dir(out)
    attr = str(work / "attribution")
    tracemalloc.start()
    for stage in ("partition", "prune"):
        tracemalloc.reset_peak()
        load = C.loadavg()
        s = time.perf_counter()
        if stage == "partition":
            summary = partition.run(
                attr, str(out / "partition"), cfg.partition, cfg.detection, 0, args.rows, 10, None, executor, log
            )
            res["detection_f1"] = summary.get("detection", {}).get("f1")
        else:
            prune.run(args.model, attr, str(out / "partition"), str(out / "prune"), cfg.prune, executor, log)
        res[f"{stage}_seconds"] = time.perf_counter() - s
        res[f"{stage}_tracemalloc_peak_mib"] = tracemalloc.get_traced_memory()[1] / 2**20
        res[f"{stage}_rss_peak_mib"] = rss_mib()
        res[f"{stage}_loadavg"] = [load, C.loadavg()]
    executor.close()
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    parser = C.quick_flag()
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--rows", type=int)
    parser.add_argument("--executor", default="local")
    parser.add_argument("--setting", default="attribution")
    parser.add_argument("--workdir")
    parser.add_argument("--model")
    parser.add_argument("--sizes", default="20000,200000")
    parser.add_argument("--executors", default="local,ray")
    parser.add_argument("--settings", default="attribution,auto")
    args = parser.parse_args()
    if args.child:
        return child(args)
    started, load_start = time.perf_counter(), C.loadavg()
    sizes = [500, 5000] if args.quick else [int(s) for s in args.sizes.split(",")]
    executors = ["local"] if args.quick else args.executors.split(",")
    settings = ["attribution"] if args.quick else args.settings.split(",")
    src = source_run(args.quick)
    model = src / "initial" / "model.pt"
    results = []
    for rows in sizes:
        work = C.RUNS / ("scale_quick" if args.quick else "scale") / str(rows)
        print(f"== replicate {rows} rows from {src}", C.loadavg(), flush=True)
        replicate(src, rows, work)
        for setting in settings:
            for ex in executors:
                print(f"== {rows} {setting} {ex}", C.loadavg(), flush=True)
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    "--rows",
                    str(rows),
                    "--executor",
                    ex,
                    "--setting",
                    setting,
                    "--workdir",
                    str(work),
                    "--model",
                    str(model),
                    "--threads",
                    str(args.threads),
                ]
                p = subprocess.run(
                    cmd, capture_output=True, text=True, cwd=C.ROOT, env={**os.environ, "PYTHONPATH": str(C.ROOT)}
                )
                line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
                if p.returncode != 0 or not line:
                    print(p.stdout[-2000:], p.stderr[-4000:])
                    results.append({"rows": rows, "executor": ex, "setting": setting, "error": p.stderr[-1500:]})
                    continue
                results.append(json.loads(line[0][7:]))
                print("   ", results[-1], flush=True)
    table, goal_rows = [], []
    for r in results:
        if "error" in r:
            table.append([r["setting"], r["executor"], r["rows"], "error", *["—"] * 8])
            continue
        table.append(
            [
                r["setting"],
                r["executor"],
                r["rows"],
                f"{r['rss_baseline_mib']:.0f}",
                f"{r['partition_rss_peak_mib']:.0f}",
                f"{r['prune_rss_peak_mib']:.0f}",
                f"{r['prune_rss_peak_mib'] - r['rss_baseline_mib']:.0f}",
                f"{r['partition_tracemalloc_peak_mib']:.1f}",
                f"{r['prune_tracemalloc_peak_mib']:.1f}",
                f"{r['partition_seconds']:.1f}",
                f"{r['prune_seconds']:.1f}",
                f"{r['detection_f1']:.3f}" if r.get("detection_f1") is not None else "—",
            ]
        )
    for setting in settings:
        for ex in executors:
            rs = sorted(
                [r for r in results if r["setting"] == setting and r["executor"] == ex and "error" not in r],
                key=lambda r: r["rows"],
            )
            if len(rs) < 2:
                continue
            a, b = rs[0], rs[-1]
            growth = b["prune_rss_peak_mib"] / a["prune_rss_peak_mib"] - 1
            d_a = a["prune_rss_peak_mib"] - a["rss_baseline_mib"]
            d_b = b["prune_rss_peak_mib"] - b["rss_baseline_mib"]
            tm = max(b["partition_tracemalloc_peak_mib"], b["prune_tracemalloc_peak_mib"]) / max(
                a["partition_tracemalloc_peak_mib"], a["prune_tracemalloc_peak_mib"]
            )
            goal_rows.append(
                [
                    f"{setting}, {ex}: driver peak memory grows < 10% for {b['rows'] // a['rows']}x samples",
                    f"peak RSS {a['prune_rss_peak_mib']:.0f} -> {b['prune_rss_peak_mib']:.0f} MiB "
                    f"({100 * growth:+.0f}%); "
                    f"above baseline {d_a:.0f} -> {d_b:.0f} MiB; tracemalloc peak x{tm:.1f}; "
                    f"time partition x{b['partition_seconds'] / a['partition_seconds']:.1f}, "
                    f"prune x{b['prune_seconds'] / a['prune_seconds']:.1f}",
                    growth < 0.10,
                ]
            )
    body = "\n".join(
        [
            f"Source shards: `{src.relative_to(C.ROOT)}/attribution` (replicated with 1% jitter).",
            "",
            C.md_table(
                [
                    "setting",
                    "executor",
                    "rows",
                    "RSS baseline MiB",
                    "RSS peak after partition",
                    "RSS peak after prune",
                    "peak - baseline",
                    "tracemalloc peak partition MiB",
                    "tracemalloc peak prune MiB",
                    "partition s",
                    "prune s",
                    "detection F1",
                ],
                table,
            ),
            "",
            "## Against the goal",
            "",
            C.md_table(["goal", "measured", "met"], goal_rows),
        ]
    )
    C.write_results(
        "scale" + ("_quick" if args.quick else ""),
        "Scale: driver memory and time, 10x samples",
        body,
        {"results": results, "source": str(src)},
        {
            "sizes": sizes,
            "executors": executors,
            "settings": {k: SETTINGS[k] for k in settings},
            "torch_threads": args.threads,
            "seed": 0,
        },
        started,
        load_start,
    )


if __name__ == "__main__":
    main()
