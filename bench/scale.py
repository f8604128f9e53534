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
        [--settings attribution,auto] [--results DIR] [--runs DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import common as C
import numpy as np

from raypipe import pipeline, storage
from raypipe.executors import LocalExecutor
from raypipe.layout import RunLayout, attribution_dir, shard_name
from raypipe.stages.attribution import shards as attribution_shards

NUM_CLASSES = 10  # Fashion-MNIST and digits alike
SETTINGS = {
    "attribution": ["detection.signal=attribution"],
    "auto": ["detection.signal=auto"],
}


def source_run(b: C.Bench) -> RunLayout:
    """A run whose attribution shards (probe [256], attribution [256]) and model are replicated:
    `<runs>/scale_src`, else label_noise.py's sym40 grad_x_act_label run, else a small run made here."""
    runs = Path(b.args.runs)
    for cand in (runs / "scale_src", runs / "label_noise" / "sym40" / "attr_grad_x_act_label"):
        lay = RunLayout(str(cand.resolve()))
        if storage.read_manifest(lay.stage("attribution")) is not None and storage.exists(lay.model("initial")):
            return lay
    out = C.fresh_dir(runs / "scale_src")
    cfg = b.config(
        ["data.max_train_samples=2000", "model.name=mlp", "initial.epochs=3", "attribution.rule=grad_x_act_label"]
    )
    log = C.log_to(out / "log.txt")
    stages = ["data", "initial", "attribution"]  # what is replicated; the rest is what this benchmark measures
    return pipeline.Run(cfg, RunLayout(str(out.resolve())), LocalExecutor(log), log).run(stages).layout


def replicate(src: RunLayout, rows: int, work: RunLayout, shard_rows: int = 2048) -> str:
    """`work`'s attribution folder: `src`'s attribution rows replicated to `rows` rows (kept when it
    already holds that many)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raypipe.tables import columns_from_table, table_from_columns

    attr_dir = work.stage("attribution")
    existing = attribution_shards(attr_dir) if storage.exists(attr_dir) else []
    if existing and sum(pq.read_metadata(uri).num_rows for uri in existing) == rows:
        return attr_dir
    C.fresh_dir(Path(attr_dir))
    tables = [storage.read_table(u) for u in attribution_shards(src.stage("attribution"))]
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
        storage.write_table(storage.join(attribution_dir(attr_dir), shard_name(shard)), table_from_columns(cols))
        written += take
        shard += 1
    return attr_dir


def child(args) -> None:
    """One measurement in this (fresh) process: the partition and prune stages on the replicated
    attribution shards of `--workdir`; prints its RESULT line."""
    import tracemalloc

    C.set_threads(args.threads)
    from raypipe.api import make_executor
    from raypipe.stages import partition, prune

    overrides = [*SETTINGS[args.setting], f"run.executor={args.executor}", "model.name=mlp", "ray.address=local"]
    cfg = C.config(overrides, args.data)
    work = RunLayout(str(Path(args.workdir).resolve()))
    out_dir = C.fresh_dir(Path(work.root, f"out_{args.setting}_{args.executor}"))
    out = RunLayout(str(out_dir), shared={"attribution": work.stage("attribution")})
    log = C.log_to(Path(work.root, f"log_{args.setting}_{args.executor}.txt"))
    executor = make_executor(cfg, log)
    # Warm the executor (Ray: start the workers) so the stages measure the work, not the start-up.
    executor.map(lambda i: i, list(range(4)), "warm-up")
    res = {"rows": args.rows, "executor": args.executor, "setting": args.setting, "rss_baseline_mib": C.peak_rss_mib()}
    tracemalloc.start()
    for stage in ("partition", "prune"):
        tracemalloc.reset_peak()
        load = C.loadavg()
        s = time.perf_counter()
        if stage == "partition":
            summary = partition.run(
                out.stage("attribution"),
                out.stage("data"),
                out.stage("partition"),
                cfg.partition,
                cfg.detection,
                0,
                args.rows,
                NUM_CLASSES,
                None,
                executor,
                log,
            )
            res["detection_f1"] = summary.get("detection", {}).get("f1")
        else:
            attribution, partitioned = out.stage("attribution"), out.stage("partition")
            prune.run(args.model, attribution, partitioned, out.stage("prune"), cfg.prune, executor, log)
        res[f"{stage}_seconds"] = time.perf_counter() - s
        res[f"{stage}_tracemalloc_peak_mib"] = tracemalloc.get_traced_memory()[1] / 2**20
        res[f"{stage}_rss_peak_mib"] = C.peak_rss_mib()
        res[f"{stage}_loadavg"] = [load, C.loadavg()]
    executor.close()
    C.child_result(res)


def main() -> None:
    parser = C.parser(__doc__)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--executor", default="local", help=argparse.SUPPRESS)
    parser.add_argument("--setting", default="attribution", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="20000,200000")
    parser.add_argument("--executors", default="local,ray")
    parser.add_argument("--settings", default="attribution,auto")
    args = parser.parse_args()
    if args.child:
        return child(args)
    b = C.Bench.start("scale", args)
    sizes = [500, 5000] if b.quick else [int(s) for s in args.sizes.split(",")]
    executors = ["local"] if b.quick else args.executors.split(",")
    settings = ["attribution"] if b.quick else args.settings.split(",")
    src = source_run(b)
    results = []
    for rows in sizes:
        work = b.runs(str(rows))
        print(f"== replicate {rows} rows from {src.root}", C.loadavg(), flush=True)
        replicate(src, rows, RunLayout(str(work.resolve())))
        for setting in settings:
            for ex in executors:
                print(f"== {rows} {setting} {ex}", C.loadavg(), flush=True)
                res = C.run_child(
                    __file__,
                    [
                        *("--rows", str(rows), "--executor", ex, "--setting", setting, "--workdir", str(work)),
                        *("--model", src.model("initial"), "--threads", str(args.threads), "--data", b.data),
                    ],
                )
                if "error" in res:
                    res = {"rows": rows, "executor": ex, "setting": setting, **res}
                results.append(res)
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
            small, big = rs[0], rs[-1]
            growth = big["prune_rss_peak_mib"] / small["prune_rss_peak_mib"] - 1
            d_small = small["prune_rss_peak_mib"] - small["rss_baseline_mib"]
            d_big = big["prune_rss_peak_mib"] - big["rss_baseline_mib"]
            tm = max(big["partition_tracemalloc_peak_mib"], big["prune_tracemalloc_peak_mib"]) / max(
                small["partition_tracemalloc_peak_mib"], small["prune_tracemalloc_peak_mib"]
            )
            goal_rows.append(
                [
                    f"{setting}, {ex}: driver peak memory grows < 10% for {big['rows'] // small['rows']}x samples",
                    f"peak RSS {small['prune_rss_peak_mib']:.0f} -> {big['prune_rss_peak_mib']:.0f} MiB "
                    f"({100 * growth:+.0f}%); "
                    f"above baseline {d_small:.0f} -> {d_big:.0f} MiB; tracemalloc peak x{tm:.1f}; "
                    f"time partition x{big['partition_seconds'] / small['partition_seconds']:.1f}, "
                    f"prune x{big['prune_seconds'] / small['prune_seconds']:.1f}",
                    growth < 0.10,
                ]
            )
    body = "\n".join(
        [
            f"Source shards: `{C.shown(src.stage('attribution'))}` (replicated with 1% jitter).",
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
            *C.goals_md(goal_rows),
        ]
    )
    b.write(
        "Scale: driver memory and time, 10x samples",
        body,
        {"results": results, "source": src.root},
        {
            "sizes": sizes,
            "executors": executors,
            "settings": {k: SETTINGS[k] for k in settings},
            "torch_threads": args.threads,
            "seed": 0,
        },
    )


if __name__ == "__main__":
    main()
