"""The whole pipeline in one process (run.executor=local) against on Ray (run.executor=ray), back to back,
at each size: wall time per stage and in total, driver peak RSS, attribution samples/s, an L-FT epoch
against a full-model epoch, test accuracy; then attribution samples/s on Ray with 1 and 2 actors and on a
2-node ray.cluster_utils.Cluster, against in-process.

Sizes up to Fashion-MNIST's 60k training images train the shipped epochs (jobs/configs/fashion_mnist.yaml:
Initial 40, Retrain 10, L-FT and F-FT 5); a larger size replicates the images (a Parquet table written
here; for time only: its test split holds copies of training images) and trains --replicated-epochs
epochs per route, so the default (20k and 200k) fits in well under an hour on 2 CPUs. Each run is a
fresh subprocess (so each driver's peak RSS, VmHWM, is its own); --abba runs local, ray, ray, local per
size and averages, which cancels a linear drift of the machine's load. Ray's start-up (ray.init) is part
of the Ray run's total and shown on its own row. On Ray the routes after the partition run side by
side when the cluster has room: their rows show each route's own seconds, and `routes (wall)` the
wall time they took together (their sum in one process).

    .venv/bin/python bench/ray_vs_local.py [--quick] [--sizes 20000,200000] [--replicated-epochs 1] [--abba]

Other sizes (or epochs) than the default write `ray_vs_local_n<sizes>.*`, beside the default's `ray_vs_local.*`.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import common as C
import numpy as np

from raypipe import pipeline
from raypipe.config import REPAIR_ROUTES, ROUTE_TITLES

EXECUTORS = ("local", "ray")
FASHION_TRAIN = 60_000  # above this many training samples the images are replicated
SHARD_ROWS = 2048
ATTRIBUTION_SETUPS = (("in-process", 0, 1), ("Ray, 1 actor", 1, 1), ("Ray, 2 actors", 1, 2), ("2-node cluster", 2, 2))


# ---------------------------------------------------------------------------------------------
# Children: one executor's pipeline run, one attribution measurement.


def pipeline_child(args) -> None:
    from raypipe.api import make_executor
    from raypipe.report.report import write_report

    cfg = C.config(json.loads(args.overrides), args.data)
    out = C.fresh_dir(Path(args.out))
    log = C.log_to(out.parent / f"log_{out.name}.txt")
    load0, t0 = C.loadavg(), time.perf_counter()
    executor = make_executor(cfg, log)
    start_s = time.perf_counter() - t0
    try:
        run = pipeline.run(cfg, str(out), executor, None, log)
    finally:
        executor.close()
    report = write_report(run.layout, cfg, run.manifests, log)
    routes = [r for r in REPAIR_ROUTES if r in run.manifests]
    spans = [run.summary(r)["wall_interval"] for r in routes]
    C.child_result(
        {
            "executor": cfg.run.executor,
            "total_seconds": time.perf_counter() - t0,
            "executor_start_seconds": start_s,
            "stages_ran": run.ran,
            "stages_seconds": report["stages_seconds"],
            "route_seconds": {r: run.summary(r)["seconds_total"] for r in ["initial", *routes]},
            "routes_wall_seconds": max(s[1] for s in spans) - min(s[0] for s in spans) if spans else 0.0,
            "routes_overlapped": report["routes_overlapped"],
            "seconds_per_epoch": {r: m["seconds_per_epoch"] for r, m in report["routes"].items()},
            "driver_peak_rss_mib": C.peak_rss_mib(),
            "rows": run.summary("data")["rows"]["train"],
            "loadavg": [load0, C.loadavg()],
            "accuracy": {r: m["accuracy"] for r, m in report["routes"].items()},
            "detection_f1": report.get("detection", {}).get("f1"),
        }
    )


def _two_node_cluster():
    """A head without CPUs and two 1-CPU worker nodes on this machine (the address file Ray's bare
    `ray.init()` reads is put back as it was)."""
    from ray._common.utils import get_ray_address_file
    from ray.cluster_utils import Cluster

    address_file = Path(get_ray_address_file(None))
    previous = address_file.read_text() if address_file.exists() else None
    root = tempfile.mkdtemp(prefix="rpvl-", dir="/tmp")  # Ray's socket paths must stay short
    nodes = dict(temp_dir=root, object_store_memory=200 * 2**20)
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, include_dashboard=False, **nodes))
    for _ in range(2):
        cluster.add_node(num_cpus=1, **nodes)
    cluster.wait_for_nodes()
    if previous is None:
        address_file.unlink(missing_ok=True)
    else:
        address_file.write_text(previous)
    return cluster, root


def attribution_child(args) -> None:
    """Samples/s of the attribution of `--base`'s training shards, in-process (nodes 0) or on Ray."""
    import ray

    from raypipe.api import make_executor
    from raypipe.layout import RunLayout
    from raypipe.stages.attribution import AttributionPass, pending_shards
    from raypipe.stages.data import train_shards

    cfg = C.config([*json.loads(args.overrides), f"ray.max_actors={args.actors}"], args.data)
    base = RunLayout(args.base)
    cluster = root = None
    if args.nodes == 2:
        cluster, root = _two_node_cluster()
        ray.init(address=cluster.address, logging_level="ERROR")
    executor = make_executor(cfg, lambda *_: None)
    if cfg.run.executor == "ray":
        executor.ready()  # its worker processes started and imported, as in the pipeline
    out = C.fresh_dir(Path(args.out))
    jobs = pending_shards(train_shards(base.stage("data")), str(out))
    a = cfg.attribution
    load0, t0 = C.loadavg(), time.perf_counter()
    spec = AttributionPass(base.model("initial"), a.rule, a.batch_size, cfg.run.device, keep_features=True)
    rows = executor.attribute(spec, jobs)
    seconds = time.perf_counter() - t0
    result = {"rows": rows, "seconds": seconds, "samples_per_s": rows / seconds, "loadavg": [load0, C.loadavg()]}
    if cluster is not None:
        result["nodes"] = len([n for n in ray.nodes() if n["Alive"]])
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    C.child_result(result)


# ---------------------------------------------------------------------------------------------
# The parent: data, the runs, the tables.


def replicated_source(b: C.Bench, n_train: int) -> list[str]:
    """A Parquet table of Fashion-MNIST's images repeated to hold `n_train` training samples after the
    parquet source's validation and test splits -> the data overrides that read it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raypipe.config import DataConfig
    from raypipe.data import load_splits

    cfg = b.config([])
    pool_rows = math.ceil(n_train / (1 - cfg.data.val_fraction - cfg.data.test_fraction)) + 1
    path = b.runs(f"fashion_mnist_x{pool_rows}.parquet")
    if not path.exists():
        splits = load_splits(DataConfig(source="fashion-mnist", path=cfg.data.path, val_fraction=0.0))
        images = np.concatenate([splits["train"].x, splits["test"].x]).reshape(-1, 784)
        labels = np.concatenate([splits["train"].true_label, splits["test"].true_label])
        take = np.arange(pool_rows) % len(labels)
        pixels = np.rint(images[take] * 255).astype(np.uint8).reshape(-1)
        table = pa.table(
            {"image": pa.FixedSizeListArray.from_arrays(pa.array(pixels), 784), "label": pa.array(labels[take])}
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
    return [
        "data.source=parquet",
        f"data.path={path.resolve()}",
        "data.shape=[1,28,28]",
        "data.num_classes=10",
        "noise.apply_to=any",  # our table of a built-in set: the same label noise as at 20k
    ]


def size_overrides(b: C.Bench, n: int) -> tuple[list[str], str]:
    """The overrides of one size, and the data set the children load (`--data`)."""
    common = [f"data.max_train_samples={n}", "ray.address=local"]  # a Ray of its own, even beside another one
    if b.quick:
        ep = [f"{r}.epochs=1" for r in ("initial", *REPAIR_ROUTES)]
        return [*common, "data.shard_rows=256", "model.name=mlp", *ep], b.data
    if n <= FASHION_TRAIN:
        return [*common, f"data.shard_rows={SHARD_ROWS}"], b.data
    ep = [f"{r}.epochs={b.args.replicated_epochs}" for r in ("initial", *REPAIR_ROUTES)]
    return [*common, f"data.shard_rows={SHARD_ROWS}", *ep, *replicated_source(b, n)], b.data


def run_size(b: C.Bench, n: int, order: list[str]) -> dict:
    overrides, data = size_overrides(b, n)
    runs = []
    for i, ex in enumerate(order):
        print(f"== {n}: {ex} ({i + 1}/{len(order)})", C.loadavg(), flush=True)
        res = C.run_child(
            __file__,
            [
                *("pipeline", "--threads", str(b.args.threads), "--out", str(b.runs(str(n), f"{i}_{ex}"))),
                *("--data", data, "--overrides", json.dumps([*overrides, f"run.executor={ex}"])),
            ],
        )
        if "error" in res:
            raise SystemExit(f"{n}: the {ex} run failed")
        runs.append(res)
        print(
            "   ", {k: res[k] for k in ("total_seconds", "executor_start_seconds", "driver_peak_rss_mib")}, flush=True
        )
    return {"n": n, "overrides": overrides, "runs": runs}


def measure_attribution(b: C.Bench, size: dict) -> dict[str, dict]:
    """Attribution samples/s of the first size's training shards with its in-process run's Initial model."""
    base = str(b.runs(str(size["n"]), f"{size['run_index']['local']}_local"))
    out = {}
    for name, nodes, actors in ATTRIBUTION_SETUPS:
        executor = "local" if nodes == 0 else "ray"
        res = C.run_child(
            __file__,
            [
                *("attribution", "--threads", str(b.args.threads), "--base", base, "--data", b.data),
                *("--out", str(b.runs("attribution", name.replace(" ", "_").replace(",", ""))), "--nodes", str(nodes)),
                *("--actors", str(actors), "--overrides", json.dumps([*size["overrides"], f"run.executor={executor}"])),
            ],
        )
        if "error" in res:
            raise SystemExit(f"attribution ({name}) failed")
        out[name] = res
        print(f"   attribution {name}: {res['samples_per_s']:.0f} samples/s", flush=True)
    return out


def _mean(runs: list[dict], ex: str, get) -> float:
    vals = [get(r) for r in runs if r["executor"] == ex]
    return sum(vals) / len(vals)


def size_tables(size: dict) -> tuple[list[str], dict]:
    """The markdown of one size and its ratios."""
    runs = size["runs"]
    m = {ex: (lambda get, ex=ex: _mean(runs, ex, get)) for ex in EXECUTORS}
    rows, ratios = [], {}

    def row(name: str, get) -> None:
        lo, ra = m["local"](get), m["ray"](get)
        ratios[name] = ra / lo if lo > 0.05 else float("nan")  # no ratio of a row local does not have
        rows.append([name, f"{lo:.1f}", f"{ra:.1f}", "—" if math.isnan(ratios[name]) else f"{ratios[name]:.2f}"])

    for stage in [s for s in pipeline.STAGE_NAMES if s in runs[0]["stages_seconds"]]:
        own = "route_seconds" if stage in REPAIR_ROUTES else "stages_seconds"
        row(stage, lambda r, s=stage, k=own: r[k].get(s, 0.0))
    row("routes (wall)", lambda r: r["routes_wall_seconds"])
    row("executor start (ray.init)", lambda r: r["executor_start_seconds"])
    row("**total wall**", lambda r: r["total_seconds"])
    ratios["lft_over_full_epoch"] = {
        ex: m[ex](lambda r: r["seconds_per_epoch"]["l_ft"] / r["seconds_per_epoch"]["initial"])
        for ex in EXECUTORS
        if "l_ft" in runs[0]["seconds_per_epoch"]
    }
    detail = [
        [
            "attribution samples / s (the stage)",
            *[f"{m[ex](lambda r: r['rows'] / r['stages_seconds']['attribution']):.0f}" for ex in EXECUTORS],
        ],
        ["driver peak RSS MiB (VmHWM)", *[f"{m[ex](lambda r: r['driver_peak_rss_mib']):.0f}" for ex in EXECUTORS]],
        *[
            [
                f"seconds per epoch {ROUTE_TITLES[r]}",
                *[f"{m[ex](lambda x, r=r: x['seconds_per_epoch'][r]):.3f}" for ex in EXECUTORS],
            ]
            for r in runs[0]["seconds_per_epoch"]
        ],
        *[
            [
                "L-FT epoch / full-model (Initial) epoch",
                *[f"{ratios['lft_over_full_epoch'][ex]:.4f}" for ex in EXECUTORS],
            ]
            for _ in ([1] if ratios["lft_over_full_epoch"] else [])
        ],
        *[
            [f"test accuracy {ROUTE_TITLES[r]}", *[f"{m[ex](lambda x, r=r: x['accuracy'][r]):.4f}" for ex in EXECUTORS]]
            for r in runs[0]["accuracy"]
        ],
        ["detection F1", *[C.fmt(m[ex](lambda x: x["detection_f1"] or float("nan"))) for ex in EXECUTORS]],
        [
            "routes that overlapped",
            "—",
            json.dumps(next(r for r in runs if r["executor"] == "ray")["routes_overlapped"]),
        ],
        ["load average per run", *[str([r["loadavg"] for r in runs if r["executor"] == ex]) for ex in EXECUTORS]],
    ]
    md = [
        f"### {size['n']} training samples",
        "",
        f"Overrides: `{' '.join(size['overrides'])}`.",
        "",
        C.md_table(["stage", "local s", "ray s", "ray / local"], rows),
        "",
        C.md_table(["", "local", "ray"], detail),
        "",
    ]
    return md, ratios


def attribution_table(measured: dict[str, dict]) -> list[str]:
    local = measured["in-process"]["samples_per_s"]
    rows = [
        [name, f"{r['samples_per_s']:.0f}", f"{r['samples_per_s'] / local:.2f}", f"{r['rows']}", str(r["loadavg"])]
        for name, r in measured.items()
    ]
    return [
        "### Attribution samples / s",
        "",
        "The first size's training shards with its in-process run's Initial model (keeping the L-FT features, as "
        "the pipeline does); each setup in a fresh process, one Ray worker process per actor started and warm "
        "before the timing (in the pipeline they start while the driver prepares the data and trains the Initial "
        "model). The 2-node cluster: "
        "`ray.cluster_utils.Cluster`, a head without CPUs and two worker nodes of 1 CPU each, on this machine.",
        "",
        C.md_table(["setup", "samples / s", "vs in-process", "rows", "load average"], rows),
        "",
    ]


def goals(sizes: list[dict], all_ratios: dict[int, dict]) -> list[list]:
    out = []
    for size in sizes:
        n, r = size["n"], all_ratios[size["n"]]
        limit = 1.15 if n <= FASHION_TRAIN else 1.05
        lo = _mean(size["runs"], "local", lambda x: x["total_seconds"])
        ra = _mean(size["runs"], "ray", lambda x: x["total_seconds"])
        out.append(
            [
                f"{n}: Ray <= {limit}x in-process (total wall)",
                f"{r['**total wall**']:.2f}x ({ra:.1f} s vs {lo:.1f} s)",
                r["**total wall**"] <= limit,
            ]
        )
        for stage in ("attribution", "partition"):
            out.append([f"{n}: {stage} on Ray at one-process speed (<= 1.05x)", f"{r[stage]:.2f}x", r[stage] <= 1.05])
        diffs = [
            abs(
                _mean(size["runs"], "ray", lambda x, k=k: x["accuracy"][k])
                - _mean(size["runs"], "local", lambda x, k=k: x["accuracy"][k])
            )
            for k in size["runs"][0]["accuracy"]
        ]
        out.append(
            [
                f"{n}: the same test accuracy on both executors (every route, <= 0.005)",
                f"largest difference {max(diffs):.4f}",
                max(diffs) <= 0.005,
            ]
        )
        if r["lft_over_full_epoch"]:
            worst = max(r["lft_over_full_epoch"].values())
            out.append(
                [
                    f"{n}: an L-FT epoch <= 1% of a full-model epoch",
                    f"{100 * worst:.2f}% (the larger of both executors)",
                    worst <= 0.01,
                ]
            )
    return out


def main() -> None:
    parser = C.parser(__doc__)
    parser.add_argument("child", nargs="?", choices=["pipeline", "attribution"], help=argparse.SUPPRESS)
    parser.add_argument("--child", dest="is_child", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--overrides", "--out", "--data", "--base"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--nodes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--actors", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="20000,200000", help="training samples per size, comma separated")
    parser.add_argument("--replicated-epochs", type=int, default=1, help="epochs per route above 60k samples")
    parser.add_argument("--abba", action="store_true", help="run local, ray, ray, local per size and average each")
    args = parser.parse_args()
    if args.is_child:
        return pipeline_child(args) if args.child == "pipeline" else attribution_child(args)
    sizes_n = [int(s) for s in args.sizes.split(",")]
    default = sizes_n == [20_000, 200_000] and args.replicated_epochs == 1
    b = C.Bench.start("ray_vs_local" if default or args.quick else f"ray_vs_local_n{'_'.join(map(str, sizes_n))}", args)
    sizes_n = [1000] if b.quick else sizes_n
    order = ["local", "ray", "ray", "local"] if args.abba else ["local", "ray"]
    sizes, all_ratios, body = [], {}, [f"Order of runs per size: {', '.join(order)} (each in a fresh subprocess).", ""]
    for n in sizes_n:
        size = run_size(b, n, order)
        size["run_index"] = {ex: order.index(ex) for ex in EXECUTORS}
        md, all_ratios[n] = size_tables(size)
        sizes.append(size)
        body += md
    attribution = measure_attribution(b, sizes[0])
    body += [*attribution_table(attribution), *C.goals_md(goals(sizes, all_ratios))]
    b.write(
        "Ray vs in-process",
        "\n".join(body),
        {"sizes": sizes, "ratios": {str(n): r for n, r in all_ratios.items()}, "attribution": attribution},
        {
            "sizes": sizes_n,
            "model": "mlp" if b.quick else "cnn_small",
            "epochs": "1 per route"
            if b.quick
            else f"shipped up to {FASHION_TRAIN} samples, {args.replicated_epochs} per route above",
            "shard_rows": 256 if b.quick else SHARD_ROWS,
            "detection.signal": "auto (default)",
            "torch_threads (local, driver)": args.threads,
            "order": order,
            "seeds": "run.seed=0, noise.seed=0, data.split_seed=0",
        },
    )


if __name__ == "__main__":
    main()
