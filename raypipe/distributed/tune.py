"""Ray Tune over the repair's settings: the thin wrapper around :mod:`raypipe.sweep`.

- the shared stages (data, initial model, one attribution per rule) run once, before any trial,
  on the configured executor (``run.executor``: in this process, or Ray Data / Ray Train);
- each trial is a Tune function trainable running :func:`raypipe.sweep.run_trial`: partition,
  prune, fine-tune, ``ray.tune.report`` after every epoch so ASHA can stop bad trials early. With
  ``sweep.workers_per_trial > 1`` the trial function drives a ``TorchTrainer`` (Ray Train inside a
  Tune function, the Train V2 pattern). Rank 0 relays each epoch's metrics through a Ray queue that
  the trial function drains into ``tune.report``. (Ray's bridge for this, ``TuneReportCallback``,
  was seen on Ray 2.60 to drop a trial's last report when the trainer finished before Tune took it;
  the relay delivers every epoch, in order, and a trial stopped by ASHA takes its trainer with it);
- resources: ``tune.with_resources`` from ``sweep.cpus_per_trial`` / ``gpus_per_trial``, concurrent
  trials from ``sweep.max_concurrent_trials`` or as many as the cluster holds
  (:func:`raypipe.sweep.plan_sweep`); trials use no Ray Data, so no trial waits on another's tasks;
- Tune's experiment lives in ``<sweep>/tune`` (local, ``s3://`` or ``gs://``); a rerun on the same
  ``--out`` after an interruption continues it with ``Tuner.restore`` (finished trials are kept,
  unfinished ones resume from their last finished epoch).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import ray
from ray import tune

from raypipe import storage
from raypipe import sweep as core
from raypipe.config import Config, ModelConfig, TrainConfig, config_from_dict
from raypipe.distributed.ray_executor import init_ray
from raypipe.stages.train import TrainRequest

TUNE_NAME = "tune"


# Test hook (tests/test_sweep.py), inert unless set on the driver: RAYPIPE_TEST_CRASH_TRIAL='{"dir": D,
# "crashes": {"<rule>:<lr>": N}}' makes the trials of that rule and learning rate raise at their start,
# the first N times (counted by marker files in D): a crash Tune retries, or one it records as errored.
TEST_CRASH_ENV = "RAYPIPE_TEST_CRASH_TRIAL"


def _injected_crash(hook: str | None, spec: core.TrialSpec) -> None:
    if not hook:
        return
    import json
    from pathlib import Path

    settings = json.loads(hook)
    times = settings["crashes"].get(f"{spec.rule}:{spec.lr:g}")
    if times is None:
        return
    key = f"{spec.rule}-{spec.lr:g}"
    done = len(list(Path(settings["dir"]).glob(f"crash-{key}-*")))
    if done < times:
        (Path(settings["dir"]) / f"crash-{key}-{done}").touch()
        raise RuntimeError(f"injected crash {done + 1} of {times} ({TEST_CRASH_ENV})")


def _trial(hp: dict[str, Any], context: dict[str, Any]) -> None:
    """The Tune function trainable: one trial."""
    import torch

    config = config_from_dict(context["config"])
    spec = core.TrialSpec.from_dict(hp["hp"])
    _injected_crash(context.get("test_crash"), spec)
    trial_id = tune.get_context().get_trial_id()
    torch.set_num_threads(max(1, int(context["cpus_per_trial"])))
    device = "cuda" if context["use_gpu"] and ray.get_gpu_ids() else "cpu"

    def log(message: str) -> None:
        print(f"[trial {trial_id}] {message}", flush=True)

    train_remote = None
    if context["workers"] > 1:

        def train_remote(request: TrainRequest) -> None:
            _train_on_workers(request, config, context)

    core.run_trial(config, context["sweep_uri"], trial_id, spec, tune.report, device, log, train_remote)


def _worker_loop(loop: dict[str, Any]) -> None:
    """Ray Train worker: the same FineTune as in-process, data-parallel. Every rank evaluates the
    validation set (the models are identical after each DDP step); rank 0 relays its metrics to the
    trial function, which reports them to Tune."""
    import ray.train
    import ray.train.torch
    import torch

    torch.set_num_threads(max(1, int(loop["cpus_per_worker"])))
    d = loop["request"]
    request = TrainRequest(**{**d, "train": TrainConfig(**d["train"]), "model": ModelConfig(**d["model"])})
    config = config_from_dict(loop["config"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    relay = loop["relay"]

    def report(metrics: dict[str, Any]) -> None:
        if rank == 0:
            relay.put(metrics)
        ray.train.report(metrics)

    finetune = core.FineTune(
        request,
        core.validation_set(config, loop["sweep_uri"]),
        ray.train.torch.get_device(),
        rank=rank,
        world=context.get_world_size(),
        wrap=ray.train.torch.prepare_model,
    )
    finetune.run(report)


def _train_on_workers(request: TrainRequest, config: Config, context: dict[str, Any]) -> None:
    """Fine-tune on a TorchTrainer started from this trial function; relay its epochs to Tune."""
    import queue
    import threading

    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Empty, Queue

    storage_path = storage.absolute(storage.join(request.out_uri, "ray_train"))
    use_gpu = context["gpus_per_worker"] > 0
    relay = Queue(actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "request": dataclasses.asdict(request),
            "config": context["config"],
            "sweep_uri": context["sweep_uri"],
            "cpus_per_worker": context["cpus_per_worker"],
            "relay": relay,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=context["workers"],
            use_gpu=use_gpu,
            resources_per_worker={
                "CPU": context["cpus_per_worker"],
                **({"GPU": context["gpus_per_worker"]} if use_gpu else {}),
            },
        ),
        run_config=ray.train.RunConfig(
            name=f"finetune-{int(time.time())}",  # a fresh run each start: finetune.pt is the resume point
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=config.ray.max_failures),
        ),
    )
    errors: queue.SimpleQueue = queue.SimpleQueue()

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # re-raised in the trial function below
            errors.put(e)

    thread = threading.Thread(target=fit, name="raypipe-finetune", daemon=True)
    thread.start()
    while True:  # report every relayed epoch, in order, until the trainer is done and the queue drained
        try:
            tune.report(relay.get(timeout=0.5))
            continue
        except Empty:
            if not thread.is_alive() and relay.empty():
                break
    thread.join()
    relay.shutdown()
    if not errors.empty():
        raise errors.get()


def run_sweep(config: Config, sweep_uri: str, log=print) -> dict[str, Any]:
    """Run (or resume) the sweep under `sweep_uri`; return {"rows", "best", "report", "counts", ...}."""
    from raypipe.api import make_executor

    start = time.perf_counter()
    sweep_uri = storage.absolute(sweep_uri)
    if config.sweep.trusted_path is not None:
        config = dataclasses.replace(
            config, sweep=dataclasses.replace(config.sweep, trusted_path=storage.absolute(config.sweep.trusted_path))
        )
    init_ray(config.ray.address, log)
    sweep_cfg = config.sweep
    specs = core.trial_specs(sweep_cfg)
    plan = core.plan_sweep(ray.cluster_resources(), sweep_cfg, len(specs))
    core.check_resumable(config, sweep_uri)

    executor = make_executor(config, log)
    try:
        base = core.prepare_base(config, sweep_uri, executor, log)
    finally:
        executor.close()
    val = core.validation_set(config, sweep_uri)  # fails here, once, not in every trial
    log(
        f"[sweep] {len(specs)} trials, objective {core.METRIC} on {len(val)} {sweep_cfg.objective}-labelled "
        f"validation samples; {plan.max_concurrent} at a time, {plan.trial_resources} each"
        + (f" + {plan.workers} Ray Train workers x {plan.cpus_per_worker:g} CPU" if plan.workers > 1 else "")
    )

    context = {
        "config": config.to_dict(),
        "sweep_uri": sweep_uri,
        "workers": plan.workers,
        "cpus_per_worker": plan.cpus_per_worker,
        "gpus_per_worker": plan.gpus_per_worker,
        "cpus_per_trial": sweep_cfg.cpus_per_trial if plan.workers == 1 else plan.trial_resources["cpu"],
        "use_gpu": plan.use_gpu,
        "test_crash": os.environ.get(TEST_CRASH_ENV),
    }
    trainable = tune.with_resources(tune.with_parameters(_trial, context=context), plan.trial_resources)
    experiment = storage.join(sweep_uri, TUNE_NAME)
    if tune.Tuner.can_restore(experiment):
        log(f"[sweep] resuming the interrupted sweep in {experiment}")
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"hp": tune.grid_search([s.to_dict() for s in specs])},
            tune_config=tune.TuneConfig(
                metric=core.METRIC,
                mode="max",
                scheduler=tune.schedulers.ASHAScheduler(
                    time_attr="epoch",
                    max_t=max(sweep_cfg.epochs),
                    grace_period=sweep_cfg.grace_period,
                    reduction_factor=sweep_cfg.reduction_factor,
                ),
                max_concurrent_trials=plan.max_concurrent,
            ),
            run_config=tune.RunConfig(
                name=TUNE_NAME,
                storage_path=sweep_uri,
                failure_config=tune.FailureConfig(max_failures=config.ray.max_failures),
                verbose=1,
            ),
        )
    grid = tuner.fit()
    trials = []
    for result in sorted(grid, key=lambda r: str(r.metrics["trial_id"])):  # ids end in the trial's index
        spec = core.TrialSpec.from_dict(result.config["hp"])
        error = None if result.error is None else f"{type(result.error).__name__}: {result.error}"
        trials.append((str(result.metrics["trial_id"]), spec, error))
    out = core.write_outputs(config, sweep_uri, trials, log)
    seconds = time.perf_counter() - start
    log(f"[sweep] done in {seconds:.1f} s; outputs under {sweep_uri}")
    return {**out, "seconds": seconds, "base_ran": base["ran"], "plan": plan}
