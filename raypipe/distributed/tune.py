"""Ray Tune over the repair's settings: the thin wrapper around :mod:`raypipe.sweep`.

- the shared stages (data, initial model, one attribution per rule) run once, before any trial, on
  the configured executor (``run.executor``: in this process, or on Ray);
- each trial is a Tune function trainable running :func:`raypipe.sweep.trial.run_trial`: the
  pipeline from the partition on, its fine-tuning reporting every epoch to ``tune.report`` so ASHA
  can stop bad trials early. With ``sweep.workers_per_trial > 1`` the fine-tuning runs on a
  ``TorchTrainer`` started from the trial function (Ray Train inside a Tune function, the Train V2
  pattern), the same training loop on every worker; rank 0 relays each epoch's metrics through a Ray
  queue that the trial function drains into ``tune.report``. (Ray's bridge for this,
  ``TuneReportCallback``, was seen on Ray 2.60 to drop a trial's last report when the trainer finished
  before Tune took it; the relay delivers every epoch, in order);
- resources: ``tune.with_resources`` from ``sweep.cpus_per_trial`` / ``gpus_per_trial``, concurrent
  trials from ``sweep.max_concurrent_trials`` or as many as the cluster holds
  (:func:`raypipe.distributed.resources.plan_sweep`); trials use no Ray Data, so no trial waits on
  another's tasks;
- Tune's experiment lives in ``<sweep>/tune`` (local, ``s3://`` or ``gs://``); a rerun on the same
  ``--out`` after an interruption continues it with ``Tuner.restore`` (finished trials are kept,
  unfinished ones resume from their last finished epoch).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Any

import ray
from ray import tune

from raypipe import storage
from raypipe.config import config_from_dict
from raypipe.distributed.ray_executor import init_ray
from raypipe.distributed.resources import Plan, plan_sweep
from raypipe.executors import LocalExecutor
from raypipe.layout import SweepLayout
from raypipe.stages import Executor
from raypipe.stages.train import TrainRequest
from raypipe.sweep import outputs, space
from raypipe.sweep import trial as sweep_trial


class _TrainOnWorkers(LocalExecutor):
    """A trial's executor when its fine-tuning runs on Ray Train workers: the partition and pruning
    in the trial's process, the training on a TorchTrainer whose rank 0 relays every epoch to Tune."""

    def __init__(self, log, context: dict[str, Any]):
        super().__init__(log, report=tune.report)
        self.context = context

    def train(self, request: TrainRequest) -> dict[str, Any]:
        from ray.util.queue import Empty, Queue

        from raypipe.distributed.train import train_on_ray

        c = self.context
        use_gpu = c["gpus_per_worker"] > 0
        plan = Plan(use_gpu, 0, 0.0, 0.0, 0.0, c["workers"], c["cpus_per_worker"], c["gpus_per_worker"])
        relay = Queue(actor_options={"num_cpus": 0})
        results: queue.SimpleQueue = queue.SimpleQueue()

        def fit() -> None:
            try:
                results.put(train_on_ray(request, plan, c["max_failures"], self.log, relay=relay))
            except BaseException as e:  # re-raised in the trial function below
                results.put(e)

        thread = threading.Thread(target=fit, name="raypipe-finetune", daemon=True)
        thread.start()
        while True:  # report every relayed epoch, in order, until the trainer is done and the queue drained
            try:
                self.report(relay.get(timeout=0.5))
                continue
            except Empty:
                if not thread.is_alive() and relay.empty():
                    break
        thread.join()
        relay.shutdown()
        outcome = results.get()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def _trial(hp: dict[str, Any], context: dict[str, Any]) -> None:
    """The Tune function trainable: one trial."""
    import torch

    spec = space.TrialSpec.from_dict(hp["hp"])
    trial_id = tune.get_context().get_trial_id()
    torch.set_num_threads(max(1, int(context["cpus_per_trial"])))
    device = "cuda" if context["use_gpu"] and ray.get_gpu_ids() else "cpu"
    config = config_from_dict(context["config"], space.SweepJobConfig)
    config = dataclasses.replace(config, run=dataclasses.replace(config.run, device=device))

    def log(message: str) -> None:
        print(f"[trial {trial_id}] {message}", flush=True)

    executor = _TrainOnWorkers(log, context) if context["workers"] > 1 else LocalExecutor(log, report=tune.report)
    sweep_trial.run_trial(config, context["sweep_uri"], trial_id, spec, tune.report, executor, log)


def _tuner(config, sweep_uri: str, specs: list[space.TrialSpec], plan, context: dict[str, Any], log) -> tune.Tuner:
    """A new Tuner over the grid of `specs`, or the interrupted one restored from ``<sweep>/tune``."""
    sweep_cfg = config.sweep
    trainable = tune.with_resources(tune.with_parameters(_trial, context=context), plan.trial_resources)
    experiment = SweepLayout(sweep_uri).tune
    if tune.Tuner.can_restore(experiment):
        log(f"[sweep] resuming the interrupted sweep in {experiment}")
        return tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space={"hp": tune.grid_search([s.to_dict() for s in specs])},
        tune_config=tune.TuneConfig(
            metric=sweep_trial.METRIC,
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
            name=experiment.rsplit("/", 1)[-1],
            storage_path=sweep_uri,
            failure_config=tune.FailureConfig(max_failures=config.ray.max_failures),
            # Tune's own tables (each trial's config and result, the status every half minute: 125 of 196 lines of
            # a 4-trial digits sweep) are off: raypipe's per-trial lines, the best trial and trials.csv say it.
            verbose=0,
        ),
    )


def run_sweep(config: space.SweepJobConfig, sweep_uri: str, executor: Executor, log=print) -> dict[str, Any]:
    """Run (or resume) the sweep under `sweep_uri`, its shared stages on `executor`; return {"rows",
    "best", "report", "counts", ...}."""
    start = time.perf_counter()
    sweep_uri = storage.absolute(sweep_uri)
    if config.sweep.trusted_path is not None:
        trusted = storage.absolute(config.sweep.trusted_path)
        config = dataclasses.replace(config, sweep=dataclasses.replace(config.sweep, trusted_path=trusted))
    init_ray(config.ray.address, log)
    specs = space.trial_specs(config.sweep)
    plan = plan_sweep(ray.cluster_resources(), config.sweep, len(specs))
    space.check_resumable(config, sweep_uri)

    base = sweep_trial.prepare_base(config, sweep_uri, executor, log)  # checks the validation set once
    n_val = len(sweep_trial.validation_set(config, sweep_uri))
    note = " (each trial scores those its detection judges clean)" if config.sweep.objective == "cleaned" else ""
    log(
        f"[sweep] {len(specs)} trials, objective {sweep_trial.METRIC} on {n_val} {config.sweep.objective}-labelled "
        f"validation samples{note}; {plan.max_concurrent} at a time, {plan.trial_resources} each"
        + (f" + {plan.workers} Ray Train workers x {plan.cpus_per_worker:g} CPU" if plan.workers > 1 else "")
    )
    context = {
        "config": config.to_dict(),
        "sweep_uri": sweep_uri,
        "workers": plan.workers,
        "cpus_per_worker": plan.cpus_per_worker,
        "gpus_per_worker": plan.gpus_per_worker,
        "cpus_per_trial": config.sweep.cpus_per_trial if plan.workers == 1 else plan.trial_resources["cpu"],
        "use_gpu": plan.use_gpu,
        "max_failures": config.ray.max_failures,
    }
    grid = _tuner(config, sweep_uri, specs, plan, context, log).fit()
    trials = []
    for result in sorted(grid, key=lambda r: str(r.metrics["trial_id"])):  # ids end in the trial's index
        spec = space.TrialSpec.from_dict(result.config["hp"])
        error = None if result.error is None else f"{type(result.error).__name__}: {result.error}"
        trials.append((str(result.metrics["trial_id"]), spec, error))
    out = outputs.write_outputs(config, sweep_uri, trials, log)
    seconds = time.perf_counter() - start
    log(f"[sweep] done in {seconds:.1f} s; outputs under {sweep_uri}")
    return {**out, "seconds": seconds, "base_ran": base["ran"], "plan": plan}
