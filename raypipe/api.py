"""The Python API, mirroring the CLI: ``raypipe.run(config, out) -> report``, ``raypipe.run_sweep(config, out)``,
and ``raypipe.load_model(out)`` -> the repaired model of a finished run.

Both check everything that can be checked before any work (`raypipe.preflight`), then hold the output
folder for the whole run (`raypipe.runlock`: one run per folder at a time), then start the executor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from raypipe import pipeline, storage
from raypipe.config import Config
from raypipe.executors import LocalExecutor
from raypipe.layout import RunLayout, SweepLayout
from raypipe.preflight import preflight
from raypipe.report.report import write_report
from raypipe.runlock import RunLock
from raypipe.stages import Executor


def make_executor(config: Config, log: Callable[[str], None] = print) -> Executor:
    """Where the stages run: ``run.executor=local`` in this process, ``ray`` on the Ray cluster."""
    if config.run.executor == "ray":
        from raypipe.distributed.ray_executor import RayExecutor  # imports Ray: only when asked for

        return RayExecutor(config, log)
    return LocalExecutor(log)


def run(config: Config, out: str, from_stage: str | None = None, log=print) -> dict[str, Any]:
    """Run (or resume) the RLAP pipeline of `config` under `out` (a local path, s3:// or gs://).

    Finished stages whose settings and inputs are unchanged are skipped; `from_stage` reruns that
    stage and everything after it. Returns the report (also written to ``<out>/report.json``).
    """
    pipeline.check_from(from_stage)
    preflight(config, out, pipeline.STAGE_NAMES)  # writes nothing: a bad input stops here, before any work
    out = storage.absolute(out)
    with RunLock(RunLayout(out).lock_file, log):
        executor = make_executor(config, log)
        try:
            finished = pipeline.run(config, out, executor, from_stage, log)
        finally:
            executor.close()
        return write_report(finished.layout, config, finished.manifests, log)


def run_sweep(config, out: str, log=print) -> dict[str, Any]:
    """Run (or resume) a Ray Tune sweep of `config` (a `raypipe.sweep.SweepJobConfig`, e.g. from
    `raypipe.load_sweep_config`) under `out`; returns the trials' rows, the best trial and its report."""
    from raypipe.distributed import tune  # imports Ray

    shared = ["base/data", "base/initial", *(f"base/{rule}/attribution" for rule in config.sweep.rules)]
    preflight(config, out, tuple(shared), sweep=True)
    out = storage.absolute(out)
    with RunLock(SweepLayout(out).lock_file, log):
        executor = make_executor(config, log)  # for the shared stages, before any trial
        try:
            return tune.run_sweep(config, out, executor, log)
        finally:
            executor.close()


def load_model(path: str, route: str = "f_ft"):
    """The model a run wrote, as a `torch.nn.Module` in eval mode on the CPU: `path` is a run directory (its
    `route`: ``f_ft`` the repaired model, ``l_ft``, ``retrain``, ``prune`` or ``initial``) or a ``model.pt``.
    It maps a float32 batch ``[B, *sample_shape]`` (pixels in [0, 1]) to logits ``[B, num_classes]``;
    ``model.probe_mask`` holds the pruned neurons (0). Loading never runs code from the file."""
    from raypipe.training.checkpoint import load_model as load_checkpoint

    uri = path if path.endswith(".pt") else RunLayout(storage.absolute(path)).model(route)
    model, _, _ = load_checkpoint(uri)
    return model.eval()
