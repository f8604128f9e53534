"""Shared runner for the benchmarks in bench/: the command line, the data set, pipeline runs through
raypipe's public API, timing with load averages, result files.

Every benchmark writes ``<results>/<name>.md`` and ``<name>.json`` (``<name>_quick.*`` for
``--quick``; ``--results`` defaults to ``bench/results``) through `Bench.write`, recording the
command that made it, the data set, the machine, the load average at every timing, subset sizes,
epoch budgets, seeds and the numbers. Scratch run directories go under ``--runs`` (default
``bench/runs``, ignored by git).

Everything under a run directory is found through `raypipe.layout`; which stages a run computed
and their seconds come from the `raypipe.pipeline.Run` it returns, never from its log lines.

The machine these were written on is shared (other jobs run on the same 2 CPUs), so every timing
carries ``os.getloadavg()`` taken right before and after it, and ratios are measured back to back in
one process wherever a table reports a ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raypipe import pipeline
from raypipe.api import make_executor
from raypipe.config import Config, load_config
from raypipe.data.sources import DEBIAN_FASHION_MNIST
from raypipe.executors import LocalExecutor
from raypipe.layout import RunLayout, shard_name
from raypipe.preflight import check_given_checkpoint

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
FASHION_CONFIG = ROOT / "jobs" / "configs" / "fashion_mnist.yaml"
INSTALL_FASHION = "apt-get install -y dataset-fashion-mnist"
DATASETS = {
    "fashion-mnist": f"Fashion-MNIST ({DEBIAN_FASHION_MNIST}), official 10k test split (clean)",
    "digits": "scikit-learn's digits (Fashion-MNIST is not installed: the --quick fallback), "
    "a stratified 20% test split (clean)",
    "random": "random tensors of each model's input shape (cost does not depend on content)",
    "synthetic-cifar": "synthetic CIFAR-shaped images (3x32x32 uint8, 10 classes) written by bench/gpu.py, "
    "a 20% test split",
}


# ---------------------------------------------------------------------------------------------
# Machine, load, timing


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def machine() -> dict[str, Any]:
    import torch
    from threadpoolctl import threadpool_info

    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "threadpools": {f"{p['internal_api']} ({p['prefix']})": p["num_threads"] for p in threadpool_info()},
        "numpy": np.__version__,
        "cuda": torch.cuda.is_available(),
    }
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        pass
    try:  # the code measured: the commit, and whether raypipe/ had uncommitted changes
        git = ["git", "-C", str(ROOT)]
        info["git_commit"] = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "raypipe"], capture_output=True, text=True).stdout
        info["raypipe_dirty"] = bool(dirty.strip())
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def peak_rss_mib() -> float:
    """Peak RSS of this process's memory image (VmHWM: reset by exec, unlike getrusage's ru_maxrss,
    which Linux carries over from the parent that forked us)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class Timings:
    """Named wall times, each with the 1-minute load average before and after."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}

    @contextmanager
    def __call__(self, name: str):
        before = loadavg()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.rows[name] = {
                "seconds": time.perf_counter() - start,
                "loadavg_before": before,
                "loadavg_after": loadavg(),
            }

    def seconds(self, name: str) -> float:
        return self.rows[name]["seconds"]


def log_to(path: Path) -> Callable[[str], None]:
    """A `log` callable for raypipe that appends to a file and echoes stage lines to stdout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a")  # noqa: SIM115 (kept open for the process)

    def log(msg: str) -> None:
        fh.write(msg + "\n")
        fh.flush()
        if msg.startswith("[") and ("done" in msg or "skipped" in msg or "detection" in msg):
            print("   ", msg, flush=True)

    return log


def set_threads(n: int) -> None:
    """`n` threads for torch and for this process's BLAS / OpenMP pools (numpy, scipy, scikit-learn),
    and the same for the processes it starts. With the pools at their default (one thread per CPU)
    on a loaded 2-CPU machine, the partition's mixture fit on 1000 rows measured 30 s; with one, 0.2 s."""
    import torch
    from threadpoolctl import threadpool_limits

    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    torch.set_num_threads(n)
    threadpool_limits(n)


def shown(path: str | Path) -> str:
    """A path as a result file shows it: relative to the repository when inside it."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


# ---------------------------------------------------------------------------------------------
# The command line and one benchmark invocation


def parser(doc: str | None, runs: bool = True) -> argparse.ArgumentParser:
    """The options every benchmark takes (`runs`: it writes run directories); a script adds its own."""
    p = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny version, for smoke tests (writes <name>_quick.*)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch and BLAS / OpenMP threads of this process (default 1: on a shared, oversubscribed machine "
        "two spinning OpenMP threads measured 10x slower per epoch than one; Ray workers get 1 thread per CPU too)",
    )
    p.add_argument("--results", type=Path, default=BENCH / "results", help="where the .md and .json go")
    if runs:
        p.add_argument("--runs", type=Path, default=BENCH / "runs", help="scratch run directories (safe to delete)")
    return p


def fashion_mnist_installed() -> bool:
    return any((DEBIAN_FASHION_MNIST / f"train-images-idx3-ubyte{gz}").exists() for gz in ("", ".gz"))


def choose_data(quick: bool) -> str:
    """Fashion-MNIST when installed; else digits for --quick (always there, so CI runs anywhere), else stop."""
    if fashion_mnist_installed():
        return "fashion-mnist"
    if quick:
        print(f"{DEBIAN_FASHION_MNIST} missing: --quick runs on scikit-learn's digits instead", flush=True)
        return "digits"
    raise SystemExit(f"error: Fashion-MNIST is missing in {DEBIAN_FASHION_MNIST}; install it: {INSTALL_FASHION}")


def config(overrides: list[str], data: str) -> Config:
    """jobs/configs/fashion_mnist.yaml on data set `data` <- overrides, validated. The benchmarks measure the method
    as published, pruning included (the paper's 40 of 256 probe neurons), though the shipped config turns it off."""
    return load_config(str(FASHION_CONFIG), [f"data.source={data}", "prune.fraction=0.156", *overrides])


@dataclass
class Bench:
    """One invocation of a benchmark: its options, the data set it runs on, where it writes."""

    name: str
    args: argparse.Namespace
    data: str = ""
    started: float = field(default_factory=time.perf_counter)
    load_start: list[float] = field(default_factory=loadavg)

    @classmethod
    def start(cls, name: str, args: argparse.Namespace) -> Bench:
        set_threads(args.threads)
        return cls(name, args, choose_data(args.quick))

    @property
    def quick(self) -> bool:
        return bool(self.args.quick)

    @property
    def data_title(self) -> str:
        return {"fashion-mnist": "Fashion-MNIST"}.get(self.data, self.data)

    @property
    def result_name(self) -> str:
        return self.name + ("_quick" if self.quick else "")

    def runs(self, *parts: str) -> Path:
        """A scratch folder of this benchmark: ``<runs>/<name>[_quick]/<parts>``."""
        return Path(self.args.runs, self.result_name, *parts)

    def config(self, overrides: list[str]) -> Config:
        return config(overrides, self.data)

    def run_variant(
        self,
        base: Path,
        out: Path,
        overrides: list[str],
        log: Callable[[str], None],
        share: tuple[str, ...] = ("data",),
        checkpoint_from_base: bool = True,
    ) -> Finished:
        """Run the pipeline in `out` with `overrides`, reusing `base`'s finished stages.

        `share` stage folders are copied from `base`; the pipeline must skip each of them (their
        manifests match), else this raises. checkpoint_from_base: repair base's initial model
        (model.checkpoint=...) instead of training one: the way to share the initial model with a run
        whose initial-stage settings differ (e.g. a detection signal that needs no training trajectory).
        """
        fresh_dir(out)
        copy_stages(base, out, share)
        if checkpoint_from_base:
            overrides = [*overrides, f"model.checkpoint={RunLayout(str(base)).model('initial')}"]
        done = run_pipeline(self.config(overrides), out, log)
        recomputed = [stage for stage in share if stage in done.run.ran]
        if recomputed:
            raise RuntimeError(f"stages {recomputed} copied into {out} were recomputed: their settings differ")
        return done

    def write(self, title: str, body_md: str, data: dict[str, Any], params: dict[str, Any]) -> Path:
        """``<results>/<name>[_quick].md`` and ``.json``: meta (command, data set, machine, load), then `data`."""
        results = Path(self.args.results)
        results.mkdir(parents=True, exist_ok=True)
        argv = [os.path.relpath(a, ROOT) if a.endswith(".py") else a for a in sys.argv]
        command = " ".join([".venv/bin/python", *argv])
        meta = {
            "command": command,
            "dataset": self.data,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "wall_seconds": round(time.perf_counter() - self.started, 1),
            "machine": machine(),
            "loadavg_start": self.load_start,
            "loadavg_end": loadavg(),
            "params": params,
        }
        md_path, json_path = results / f"{self.result_name}.md", results / f"{self.result_name}.json"
        json_path.write_text(json.dumps({"meta": meta, **data}, indent=1, default=_jsonable))
        m, load_start = meta["machine"], self.load_start
        busy = max(load_start[0], meta["loadavg_end"][0]) > 2.5
        header = [
            f"# {title}",
            "",
            f"Command: `{command}` (wall {meta['wall_seconds']} s, finished {meta['finished_at']}).",
            f"Data: {DATASETS.get(self.data, self.data or '—')}.",
            f"Machine: {m['platform']}, {m['cpus']} CPUs, {m.get('mem_total_gib', '?')} GiB, torch {m['torch']} "
            f"({m['torch_threads']} threads), ray {m.get('ray', '—')}, CUDA {m['cuda']}; raypipe at "
            f"{m.get('git_commit', '?')[:7]}{' (+uncommitted changes)' if m.get('raypipe_dirty') else ''}. "
            f"Load average (1/5/15 min) at start {load_start}, at end {meta['loadavg_end']}"
            + (
                " — the CPUs were shared with other jobs, so absolute seconds are noisy; ratios were measured "
                "back to back."
                if busy
                else " (2 CPUs, about this benchmark's own load)."
            ),
            "",
            "Parameters: " + ", ".join(f"{k}={_short(v)}" for k, v in params.items()),
            "",
            "",
        ]
        md_path.write_text("\n".join(header) + body_md.rstrip() + "\n")
        print(f"wrote {md_path}")
        return md_path


# ---------------------------------------------------------------------------------------------
# Pipeline runs


def label_noise_overrides(n: int, epochs: int, model: str, ft_epochs: int) -> list[str]:
    """The label-noise benchmarks' common settings (label_noise.py, detection_vs_cleanlab.py): one
    list, so the second reuses the first's data and Initial stages (their fingerprints match).
    Fine-tuning: the paper's Adam lr 1e-3."""
    return [
        f"data.max_train_samples={n}",
        "data.shard_rows=2048",
        f"model.name={model}",
        f"initial.epochs={epochs}",
        "initial.batch_size=64",
        f"retrain.epochs={epochs}",
        "retrain.batch_size=64",
        f"l_ft.epochs={ft_epochs}",
        f"f_ft.epochs={ft_epochs}",
        "l_ft.lr=1e-3",
        "f_ft.lr=1e-3",
        "attribution.rule=loss",
        "run.executor=local",
    ]


def gap(acc: float, initial: float, oracle: float) -> float:
    """The share of the Initial -> Oracle gap a route closed (0: no better than the Initial, 1: the Oracle)."""
    return (acc - initial) / (oracle - initial) if oracle != initial else float("nan")


def overhead_seconds(seconds: dict[str, float]) -> float:
    """What a repair route pays besides its own training (attribution + partition + prune, as
    report.json's seconds_total counts it), from per-stage seconds, wall or CPU."""
    from raypipe.report.report import REPAIR_OVERHEAD

    return sum(seconds.get(stage, 0.0) for stage in REPAIR_OVERHEAD)


@dataclass
class Finished:
    """A pipeline run: the pipeline's record (`run.ran`, `run.manifests`), its report, and this
    process's CPU seconds per computed stage."""

    run: pipeline.Run
    report: dict[str, Any]
    cpu_seconds: dict[str, float]

    @property
    def layout(self) -> RunLayout:
        return self.run.layout

    @property
    def skipped(self) -> list[str]:
        """Stages found finished (manifest matched) and not recomputed."""
        return [name for name in self.run.manifests if name not in self.run.ran]


def run_pipeline(cfg: Config, out: Path, log: Callable[[str], None], from_stage: str | None = None) -> Finished:
    """One raypipe run in this process (run.executor decides local or Ray) and its report.

    The stage table runs one stage at a time (`Run.run([name])`, the order `Run.run()` takes) so that
    each computed stage's CPU seconds of this process (time.process_time) can be taken. On a shared
    machine CPU seconds are far steadier than wall seconds (they do not count the time other jobs
    held the CPU); with run.executor=ray most work runs in other processes and they mean little.
    """
    from raypipe.report.report import write_report  # matplotlib: only when a report is written

    if cfg.model.checkpoint is not None:
        check_given_checkpoint(cfg)
    executor = make_executor(cfg, log)
    cpu: dict[str, float] = {}
    try:
        run = pipeline.Run(cfg, RunLayout(str(out.resolve())), executor, log, from_stage)
        for name in pipeline.STAGE_NAMES:
            start = time.process_time()
            run.run([name])
            if name in run.ran:
                cpu[name] = time.process_time() - start
    finally:
        executor.close()
    return Finished(run, write_report(run.layout, cfg, run.manifests, log), cpu)


def copy_stages(src: Path, dst: Path, stages: tuple[str, ...] = ("data", "initial")) -> None:
    """Seed `dst` with finished stage folders of `src`, so a run there skips them (the manifests
    match when the data / noise / model / initial settings are equal)."""
    src_layout, dst_layout = RunLayout(str(src)), RunLayout(str(dst))
    for stage in stages:
        shutil.rmtree(dst_layout.stage(stage), ignore_errors=True)
        shutil.copytree(src_layout.stage(stage), dst_layout.stage(stage))


def write_truth_partition(data_uri: str, out_uri: str) -> None:
    """A partition folder whose clean part is the truly clean samples (p_noisy = is_corrupted), written
    by the partition stage's own writer, one shard per training shard."""
    import pyarrow as pa

    from raypipe import storage
    from raypipe.stages.data import train_shards
    from raypipe.stages.partition import write_split
    from raypipe.tables import columns_from_table

    columns = ["sample_id", "label", "true_label", "is_corrupted"]
    tables = [storage.read_table(uri, columns=columns) for uri in train_shards(data_uri)]
    cols = columns_from_table(pa.concat_tables(tables))
    cols["pred_label"] = cols["label"]  # no model predicted anything here
    cols["best_other_label"] = cols["true_label"]  # the suggestion for a flagged (truly corrupted) sample
    cols["loss"] = np.zeros(len(cols["label"]), dtype=np.float32)
    p_noisy = cols["is_corrupted"].astype(np.float32)
    names = [shard_name(i) for i in range(len(tables))]
    lengths = [t.num_rows for t in tables]
    write_split(out_uri, names, lengths, cols, p_noisy, p_noisy < 0.5, p_noisy, {"ground_truth": p_noisy})


def oracle(cfg: Config, base: Path, out: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """A fresh model trained on the truly clean samples only: the pipeline's own `retrain` request on a
    run (`out`) whose data is `base`'s and whose partition is the ground truth. -> the route's summary,
    with its wall and CPU seconds and the load average around it."""
    from raypipe.stages.train import train_local

    fresh_dir(out)
    lay = RunLayout(str(out.resolve()), shared={"data": RunLayout(str(base.resolve())).stage("data")})
    write_truth_partition(lay.stage("data"), lay.stage("partition"))
    request = pipeline.train_request(pipeline.Run(cfg, lay, LocalExecutor(log), log), "retrain", lay.stage("retrain"))
    load, start, cpu0 = loadavg(), time.perf_counter(), time.process_time()
    metrics = train_local(request, log)
    metrics["wall_seconds"] = time.perf_counter() - start
    metrics["cpu_seconds"] = time.process_time() - cpu0
    metrics["loadavg_before"], metrics["loadavg_after"] = load, loadavg()
    return metrics


def run_child(script: str, args: list[str]) -> dict[str, Any]:
    """`python <script> --child <args>` in a fresh process (so its peak RSS is its own) -> the JSON it
    printed on its `RESULT ` line, or {"error": ...} when it failed."""
    p = subprocess.run([sys.executable, script, "--child", *args], capture_output=True, text=True, cwd=ROOT)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode != 0 or not line:
        print(p.stdout[-2000:], p.stderr[-4000:])
        return {"error": p.stderr[-1500:] or p.stdout[-1500:]}
    return json.loads(line[0][len("RESULT ") :])


def child_result(res: dict[str, Any]) -> None:
    """What a `--child` process hands back to `run_child`."""
    print("RESULT " + json.dumps(res, default=_jsonable), flush=True)


# ---------------------------------------------------------------------------------------------
# Markdown


def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.{digits}f}"
    return str(v)


def md_table(header: list[str], rows: list[list[Any]], digits: int = 4) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(v, digits) for v in row) + " |")
    return "\n".join(lines)


def goals_md(rows: list[list[Any]], title: str = "Against the goal") -> list[str]:
    """The closing section of every result file: goal, measured value, met."""
    return [f"## {title}", "", md_table(["goal", "measured", "met"], rows)]


def _short(v: Any) -> str:
    return json.dumps(v, default=_jsonable) if not isinstance(v, str) else v


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)
