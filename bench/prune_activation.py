"""Which activations the sensitivity regression reads: the paper's pre-ReLU h(x), or relu(h(x)), what the next layer
sees. Read on the runs of bench/matched_budget.py (same Initial, attribution and partition per noise and seed):
every repair route from the Initial pruned by each rule, and from the unpruned Initial, on the clean test split;
and how often the pruned neurons fire (relu(h) > 0) on the training split. A neuron that never fires passes
nothing to the head, so pruning it changes no prediction.

    .venv/bin/python bench/prune_activation.py [--quick] --runs DIR [--seeds 0,1,2] [--noises sym40,pairs40]
        [--n 20000] [--initial-epochs 80] [--ft-epochs 10] [--model cnn_small]

The settings must be those the matched_budget runs under --runs were made with (their stages are reused, not
recomputed; a setting that differs recomputes from that stage on). --quick makes its own tiny matched_budget run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import common as C
import numpy as np
from matched_budget import add_run_options, overrides

from raypipe import layout, pipeline, storage
from raypipe.config import FINE_TUNE_ROUTES, ROUTE_TITLES
from raypipe.executors import LocalExecutor
from raypipe.layout import RunLayout
from raypipe.stages.attribution import shards as attribution_shards
from raypipe.tables import columns_from_table

SHARED = ("data", "initial", "attribution", "partition")
STARTS = ("unpruned", "pre_relu", "post_relu")


def firing_share(attribution_uri: str, neurons: list[int]) -> float:
    """The share of (training sample, pruned neuron) pairs where the neuron fires: h > 0 (the stored probe is h)."""
    if not neurons:
        return float("nan")
    fired, seen = 0, 0
    for shard in attribution_shards(attribution_uri):
        h = columns_from_table(storage.read_table(shard, columns=["probe"]))["probe"][:, neurons]
        fired, seen = fired + int((h > 0).sum()), seen + h.size
    return fired / seen


def finished_accuracy(lay: RunLayout, route: str) -> float:
    manifest = storage.read_manifest(lay.stage(route))
    if manifest is None:
        raise SystemExit(f"error: no finished '{route}' in '{lay.stage(route)}'; run bench/matched_budget.py first")
    return manifest["summary"]["accuracy"]


def pruned_neurons(lay: RunLayout) -> list[int]:
    return storage.read_json(layout.neurons_file(lay.stage("prune")))["pruned"]


def one_seed(b: C.Bench, over: list[str], work: Path, log) -> dict:
    """The matched_budget run's own unpruned and pre-ReLU (its base run) routes, read; the post-ReLU ones, run."""
    base = RunLayout(str((work / "base").resolve()))
    shared = {s: base.stage(s) for s in SHARED}
    post = RunLayout(str((work / "post_relu").resolve()), shared)
    pipeline.Run(b.config([*over, "prune.activation=post_relu"]), post, LocalExecutor(log), log).run(
        ["prune", *FINE_TUNE_ROUTES]
    )
    layouts = {"unpruned": RunLayout(str((work / "unpruned").resolve()), shared), "pre_relu": base, "post_relu": post}
    out = {}
    for start, lay in layouts.items():
        neurons = pruned_neurons(lay) if start != "unpruned" else []
        out[start] = {
            "accuracy": {r: finished_accuracy(lay, r) for r in FINE_TUNE_ROUTES},
            "n_pruned": len(neurons),
            "firing_share": firing_share(base.stage("attribution"), neurons),
            "neurons": neurons,
        }
    out["overlap"] = len(set(out["pre_relu"]["neurons"]) & set(out["post_relu"]["neurons"]))
    return out


def gains(seeds: dict, start: str, route: str) -> list[float]:
    """Per seed: the route from the Initial pruned by `start`'s rule minus the same route unpruned (test accuracy)."""
    return [s[start]["accuracy"][route] - s["unpruned"]["accuracy"][route] for s in seeds.values()]


def goals(per_noise: dict[str, dict]) -> list[list]:
    """Pruning keeps its place in the default route only where it helps: every route, on average over seeds."""
    rows = []
    for noise, seeds in per_noise.items():
        for start in ("pre_relu", "post_relu"):
            mean = {r: float(np.mean(gains(seeds, start, r))) for r in FINE_TUNE_ROUTES}
            measured = ", ".join(f"{ROUTE_TITLES[r]} {v:+.4f}" for r, v in mean.items())
            rows.append(
                [
                    f"{noise}: pruning ({start}) helps every route (pruned - unpruned > 0)",
                    measured,
                    all(v > 0 for v in mean.values()),
                ]
            )
    return rows


def render(per_noise: dict[str, dict]) -> str:
    header = ["noise", "seed", "route", "unpruned", "pruned (pre-ReLU)", "pruned (post-ReLU)", "pre - un", "post - un"]
    rows, lines = [], []
    for noise, seeds in per_noise.items():
        for seed, s in seeds.items():
            for route in FINE_TUNE_ROUTES:
                acc = {start: s[start]["accuracy"][route] for start in STARTS}
                rows.append(
                    [noise, seed, ROUTE_TITLES[route]]
                    + [f"{acc[k]:.4f}" for k in STARTS]
                    + [f"{acc['pre_relu'] - acc['unpruned']:+.4f}", f"{acc['post_relu'] - acc['unpruned']:+.4f}"]
                )
            lines.append(
                f"- {noise} seed {seed}: pruned neurons fire on {s['pre_relu']['firing_share']:.2%} (pre-ReLU rule) / "
                f"{s['post_relu']['firing_share']:.2%} (post-ReLU rule) of the training samples; "
                f"{s.get('overlap', 0)} of {s['pre_relu']['n_pruned']} neurons in common."
            )
    means = []
    for noise, seeds in per_noise.items():
        for route in FINE_TUNE_ROUTES:
            d = {k: gains(seeds, k, route) for k in STARTS}
            means.append(
                [noise, ROUTE_TITLES[route], len(seeds)]
                + [f"{np.mean(d[k]):+.4f} ± {np.std(d[k]):.4f}" for k in ("pre_relu", "post_relu")]
            )
    mean_table = C.md_table(
        ["noise", "route", "seeds", "pruned pre-ReLU - unpruned", "pruned post-ReLU - unpruned"], means
    )
    return "\n".join([mean_table, "", C.md_table(header, rows), "", *lines, ""])


def main() -> None:
    parser = C.parser(__doc__)
    add_run_options(parser)  # matched_budget's, defaults included: its runs are read with the settings they had
    args = parser.parse_args()
    b = C.Bench.start("prune_activation", args)
    if b.quick:  # a tiny matched_budget run of its own to read
        here = Path(__file__).parent
        cmd = [sys.executable, str(here / "matched_budget.py"), "--quick", "--runs", str(args.runs)]
        subprocess.run([*cmd, "--results", str(Path(args.runs) / "results")], check=True)
        n, epochs, ft_epochs, model, noises, seeds = 600, 4, 2, "mlp", ["sym40"], [0]
        source = Path(args.runs) / "matched_budget_quick"
    else:
        n, epochs, ft_epochs, model = args.n, args.initial_epochs, args.ft_epochs, args.model
        noises, seeds = args.noises.split(","), [int(s) for s in args.seeds.split(",")]
        source = Path(args.runs) / "matched_budget"
    per_noise: dict[str, dict] = {}
    for noise in noises:
        for seed in seeds:
            work = source / noise / f"seed{seed}"
            if not (work / "unpruned").is_dir():
                print(f"== {noise} seed {seed}: no finished matched_budget run in {work}, left out", flush=True)
                continue
            print(f"== {noise} seed {seed}", C.loadavg(), flush=True)
            log = C.log_to(work / "prune_activation_log.txt")
            per_noise.setdefault(noise, {})[seed] = one_seed(
                b, overrides(n, epochs, model, ft_epochs, noise, seed), work, log
            )
    params = {"train_samples": n, "model": model, "epochs": epochs, "ft_epochs": ft_epochs, "runs": str(source)}
    body = "\n".join(C.goals_md(goals(per_noise))) + "\n\n" + render(per_noise)
    b.write("Pruning: the regression on pre-ReLU or post-ReLU activations", body, {"per_seed": per_noise}, params)


if __name__ == "__main__":
    main()
