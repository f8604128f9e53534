"""Shared runner for the benchmarks in bench/: configs, timing with load averages, result files.

Every benchmark writes ``bench/results/<name>.md`` and ``bench/results/<name>.json`` through
`write_results`, recording the command that made it, the machine, the load average at every timing,
subset sizes, epoch budgets, seeds and the numbers.

The machine these were written on is shared (other jobs run on the same 2 CPUs), so every timing
carries ``os.getloadavg()`` taken right before and after it, and ratios are measured back to back in
one process wherever a table reports a ratio.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
RUNS = BENCH / "runs"  # scratch run directories (ignored by the tables; safe to delete)
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CONFIG = ROOT / "jobs" / "configs" / "fashion_mnist.yaml"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------------------------------
# Machine, load, timing


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def machine() -> dict[str, Any]:
    import numpy
    import torch

    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": numpy.__version__,
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


# ---------------------------------------------------------------------------------------------
# Data and configs


def ensure_fashion_mnist() -> None:
    """Fashion-MNIST from Debian's package; installed when absent (the benchmarks' only set-up)."""
    if (FASHION_DIR / "train-images-idx3-ubyte.gz").exists() or (FASHION_DIR / "train-images-idx3-ubyte").exists():
        return
    print(f"{FASHION_DIR} missing: apt-get install -y dataset-fashion-mnist", flush=True)
    cmd = ["apt-get", "install", "-y", "dataset-fashion-mnist"]
    if os.geteuid() != 0 and shutil.which("sudo"):
        cmd = ["sudo", *cmd]
    subprocess.run(cmd, check=True)


def config(overrides: list[str], base: Path | None = FASHION_CONFIG):  # noqa: D401
    """jobs/configs/fashion_mnist.yaml (or `base`) <- overrides, validated."""
    from raypipe.config import load_config

    return load_config(base, overrides)


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


def has_detection_section() -> bool:
    """True once raypipe.config grows a `detection` section (neighbour-agreement detection)."""
    import dataclasses

    from raypipe.config import Config

    return any(f.name == "detection" for f in dataclasses.fields(Config))


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def run_pipeline(cfg, out: Path, log: Callable[[str], None], from_stage: str | None = None) -> dict[str, Any]:
    """One raypipe run in this process (run.executor decides local or Ray); returns report.json, plus
    `stages_cpu_seconds`: this process's CPU time per computed stage (time.process_time between
    consecutive "[stage] done" lines). On a shared machine CPU seconds are far steadier than wall
    seconds (they do not count the time other jobs held the CPU); with run.executor=ray most work runs
    in other processes and these are not meaningful."""
    import re

    import raypipe

    cpu: dict[str, float] = {}
    last = [time.process_time()]
    pattern = re.compile(r"^\[(\w+)\] (done in|up to date)")

    def spy(msg: str) -> None:
        m = pattern.match(msg)
        if m:
            now = time.process_time()
            if m.group(2) == "done in":
                cpu[m.group(1)] = now - last[0]
            last[0] = now
        log(msg)

    report = raypipe.run(cfg, str(out), from_stage=from_stage, log=spy)
    report["stages_cpu_seconds"] = cpu
    return report


def manifest(run_dir: Path, stage: str) -> dict[str, Any]:
    return json.loads((run_dir / stage / "_manifest.json").read_text())


def copy_stages(src: Path, dst: Path, stages: tuple[str, ...] = ("data", "initial")) -> None:
    """Seed `dst` with finished stage directories of `src`, so a run there skips them (the manifests
    match when the data / noise / model / initial settings are equal)."""
    dst.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        if (dst / stage).exists():
            shutil.rmtree(dst / stage)
        shutil.copytree(src / stage, dst / stage)


def train_truth(run_dir: Path):
    """The noisy training split of a run, with its ground truth (SampleSet)."""
    from raypipe.stages.data import read_split

    return read_split(str(run_dir / "data"), "train")


def write_partition_from_flags(data_uri: str, out_dir: Path, flagged_by_id: dict[int, float] | None = None) -> Path:
    """A partition directory (what routes read: sample_id, label, pred_label, p_noisy, is_clean) built
    from given flags instead of the mixture.

    flagged_by_id None: the ground truth (p_noisy = is_corrupted), i.e. the Oracle's clean set.
    Otherwise a dict sample_id -> p_noisy (a sample is clean when p_noisy < 0.5).
    """
    import numpy as np
    import pyarrow.parquet as pq

    from raypipe import storage
    from raypipe.stages.data import train_shards
    from raypipe.tables import columns_from_table, table_from_columns

    fresh_dir(out_dir)
    for uri in train_shards(data_uri):
        table = storage.read_table(uri, columns=["sample_id", "label", "true_label", "is_corrupted"])
        cols = columns_from_table(table)
        if flagged_by_id is None:
            p = cols["is_corrupted"].astype(np.float32)
        else:
            p = np.asarray([flagged_by_id[int(i)] for i in cols["sample_id"]], dtype=np.float32)
        out = {
            "sample_id": cols["sample_id"],
            "label": cols["label"],
            "pred_label": cols["label"],
            "true_label": cols["true_label"],
            "is_corrupted": cols["is_corrupted"],
            "p_noisy": p,
            "is_clean": p < 0.5,
        }
        pq.write_table(table_from_columns(out), str(out_dir / uri.rsplit("/", 1)[-1]))
    return out_dir


def train_route(
    cfg,
    run_dir: Path,
    route: str,
    out_dir: Path,
    partition_dir: Path | None,
    init: str | None,
    log=print,
    train_cfg=None,
) -> dict[str, Any]:
    """One route in this process through raypipe.stages.train.train_local (the LocalExecutor's path)."""
    from raypipe.stages.train import TrainRequest, train_local

    request = TrainRequest(
        route=route,
        train=train_cfg or cfg.section("retrain" if route == "oracle" else route),
        data_uri=str(run_dir / "data"),
        out_uri=str(out_dir),
        model=cfg.model,
        seed=cfg.run.seed,
        partition_uri=str(partition_dir) if partition_dir is not None else None,
        init_model_uri=init,
        device=cfg.run.device,
    )
    fresh_dir(out_dir)
    start, cpu0 = time.perf_counter(), time.process_time()
    load = loadavg()
    metrics = train_local(request, log)
    metrics["wall_seconds"] = time.perf_counter() - start
    metrics["cpu_seconds"] = time.process_time() - cpu0
    metrics["loadavg_before"] = load
    metrics["loadavg_after"] = loadavg()
    return metrics


def oracle(cfg, run_dir: Path, log=print) -> dict[str, Any]:
    """A fresh model trained on the truly clean samples only (the `retrain` route on the ground-truth
    partition), with the retrain recipe."""
    part = write_partition_from_flags(str(run_dir / "data"), run_dir / "oracle_partition")
    return train_route(cfg, run_dir, "retrain", run_dir / "oracle", part, None, log, train_cfg=cfg.retrain)


# ---------------------------------------------------------------------------------------------
# Results


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


def write_results(
    name: str,
    title: str,
    body_md: str,
    data: dict[str, Any],
    params: dict[str, Any],
    started: float,
    load_start: list[float],
) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = " ".join([".venv/bin/python", *[os.path.relpath(a, ROOT) if a.endswith(".py") else a for a in sys.argv]])
    meta = {
        "command": command,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "machine": machine(),
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "params": params,
    }
    payload = {"meta": meta, **data}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1, default=_jsonable))
    m = meta["machine"]
    header = [
        f"# {title}",
        "",
        f"Command: `{command}` (wall {meta['wall_seconds']} s, finished {meta['finished_at']}).",
        f"Machine: {m['platform']}, {m['cpus']} CPUs, {m.get('mem_total_gib', '?')} GiB, torch {m['torch']} "
        f"({m['torch_threads']} threads), ray {m.get('ray', '—')}, CUDA {m['cuda']}; raypipe at "
        f"{m.get('git_commit', '?')[:7]}{' (+uncommitted changes)' if m.get('raypipe_dirty') else ''}. "
        f"Load average (1/5/15 min) at start {load_start}, at end {meta['loadavg_end']}"
        + (
            " — the CPUs were shared with other jobs, so absolute seconds are noisy; ratios were measured back to back."
            if max(load_start[0], meta["loadavg_end"][0]) > 2.5
            else " (2 CPUs, about this benchmark's own load)."
        ),
        "",
        "Parameters: " + ", ".join(f"{k}={_short(v)}" for k, v in params.items()),
        "",
    ]
    (RESULTS / f"{name}.md").write_text("\n".join(header) + body_md.rstrip() + "\n")
    print(f"wrote {RESULTS / (name + '.md')}")
    return RESULTS / f"{name}.md"


def _short(v: Any) -> str:
    s = json.dumps(v, default=_jsonable) if not isinstance(v, str) else v
    return s


def _jsonable(v: Any) -> Any:
    import numpy as np

    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, Path):
        return str(v)
    return str(v)


def quick_flag(argv: list[str] | None = None):
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny version (< 1 minute), for smoke tests")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads of this process (default 1: on a shared, oversubscribed machine two "
        "spinning OpenMP threads measured 10x slower per epoch than one; Ray workers get 1 thread per CPU too)",
    )
    return parser


def set_threads(n: int) -> None:
    import torch

    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


def run_variant(
    base: Path,
    out: Path,
    overrides: list[str],
    log,
    share: tuple[str, ...] = ("data",),
    checkpoint_from_base: bool = True,
) -> tuple[dict[str, Any], list[str]]:
    """Run the pipeline in `out` with `overrides`, reusing `base`'s finished stages.

    `share` stage directories are copied from `base`; the pipeline skips each one whose manifest
    fingerprint matches (verified: the returned list names the stages it actually skipped).
    checkpoint_from_base: repair base's initial model (model.checkpoint=...) instead of training one:
    the way to share the initial model with a run whose initial-stage settings differ (e.g. a
    detection signal that needs no training trajectory).
    """
    fresh_dir(out)
    copy_stages(base, out, share)
    if checkpoint_from_base:
        overrides = [*overrides, f"model.checkpoint={base / 'initial' / 'model.pt'}"]
    cfg = config(overrides)
    skipped: list[str] = []

    def spy(msg: str) -> None:
        if msg.endswith("up to date, skipped"):
            skipped.append(msg.split("]")[0].lstrip("["))
        log(msg)

    report = run_pipeline(cfg, out, spy)
    for stage in share:
        if stage not in skipped:
            raise RuntimeError(f"stage '{stage}' copied into {out} was recomputed: its settings differ from {base}")
    return report, skipped
