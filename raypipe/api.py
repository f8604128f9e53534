"""The Python API, mirroring the CLI: ``raypipe.run(config, out) -> report``, ``raypipe.run_sweep(config, out)``,
``raypipe.find_label_issues(config, out) -> DataFrame`` (detection alone) and ``raypipe.load_model(out)`` -> the
repaired model of a finished run.

Both check everything that can be checked before any work (`raypipe.preflight`), then hold the output
folder for the whole run (`raypipe.runlock`: one run per folder at a time), then start the executor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from raypipe import layout, pipeline, storage
from raypipe.config import Config, dump_config
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


@contextmanager
def _held(config: Config, out: str, log) -> Iterator[tuple[str, Executor]]:
    """The output folder held for the whole run (one run per folder at a time) and the executor, closed after."""
    out = storage.absolute(out)
    with RunLock(RunLayout(out).lock_file, log):
        executor = make_executor(config, log)
        try:
            yield out, executor
        finally:
            executor.close()


def run(config: Config, out: str, from_stage: str | None = None, log=print) -> dict[str, Any]:
    """Run (or resume) the RLAP pipeline of `config` under `out` (a local path, s3:// or gs://).

    Finished stages whose settings and inputs are unchanged are skipped; `from_stage` reruns that
    stage and everything after it. Returns the report (also written to ``<out>/report.json``).
    """
    pipeline.check_from(from_stage)
    preflight(config, out, pipeline.STAGE_NAMES)  # writes nothing: a bad input stops here, before any work
    with _held(config, out, log) as (out, executor):
        finished = pipeline.run(config, out, executor, from_stage, log)
        return write_report(finished.layout, config, finished.manifests, log)


def find_label_issues(config: Config, out: str, model: str | None = None, log=print):
    """Detection alone: the stages data -> initial (or `model`, a raypipe ``model.pt`` to inspect instead of training
    one) -> attribution -> partition under `out`, as `run` would run them (a later `run` with the same settings
    skips them). Returns the label issues table as a pandas DataFrame, every training sample, most suspect first:
    is_label_issue, label_score (higher = cleaner), given_label, predicted_label, suggested_label, p_noisy and each
    detection signal's score (also in ``<out>/partition/issues/``)."""
    if model is not None:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, checkpoint=model)).validate()
    preflight(config, out, pipeline.DETECTION_STAGES)
    with _held(config, out, log) as (out, executor):
        finished = pipeline.run(config, out, executor, log=log, stages=pipeline.DETECTION_STAGES)
    return storage.read_table(layout.label_issues_file(finished.layout.stage("partition"))).to_pandas()


def run_sweep(config, out: str, log=print) -> dict[str, Any]:
    """Run (or resume) a Ray Tune sweep of `config` (a `raypipe.sweep.SweepJobConfig`, e.g. from
    `raypipe.load_sweep_config`) under `out`; returns the trials' rows, the best trial and its report."""
    from raypipe.distributed import tune  # imports Ray

    shared = ["base/data", "base/initial", *(f"base/{rule}/attribution" for rule in config.sweep.rules)]
    preflight(config, out, tuple(shared), sweep=True)
    out = storage.absolute(out)
    with RunLock(SweepLayout(out).lock_file, log):
        storage.write_bytes(SweepLayout(out).config_file, dump_config(config).encode())
        executor = make_executor(config, log)  # for the shared stages, before any trial
        try:
            return tune.run_sweep(config, out, executor, log)
        finally:
            executor.close()


def load_model(path: str, route: str = "f_ft"):
    """The model a run wrote, as a `torch.nn.Module` in eval mode on the CPU: `path` is a run directory (its
    `route`: ``f_ft`` the repaired model, ``l_ft``, ``relabel``, ``retrain``, ``prune`` or ``initial``; report.json
    `recommended_route` names the one to use) or a ``model.pt``.
    It maps a float32 batch ``[B, *sample_shape]`` (pixels in [0, 1]) to logits ``[B, num_classes]``;
    ``model.probe_mask`` holds the pruned neurons (0). Loading never runs code from the file."""
    from raypipe.training.checkpoint import load_model as load_checkpoint

    uri = path if path.endswith(".pt") else RunLayout(storage.absolute(path)).model(route)
    model, _, _ = load_checkpoint(uri)
    return model.eval()
