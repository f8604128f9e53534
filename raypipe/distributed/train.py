"""The training stages on Ray: the one training loop (`raypipe.stages.train.train_route`) in a Ray task
(one worker) or on Ray Train workers (several, data-parallel).

- One worker (`plan.num_workers == 1`: what a small cluster, or one GPU, gives each route): the route
  runs in a Ray task holding the worker's CPUs (and GPU): no TorchTrainer, no worker group, no Ray Data
  pass to start. A task whose worker process dies is run again (`max_retries = ray.max_failures`) and
  resumes from the stage's ``checkpoint.pt``. The task also scores the model on the test split, so
  routes that run side by side each pay for their own.
- Several workers: a TorchTrainer; each worker trains a DistributedDataParallel copy (gloo on CPU, nccl
  on GPU, chosen by Ray Train). On a worker failure Ray Train restarts the group
  (`FailureConfig(max_failures)`) and every worker resumes from ``checkpoint.pt``, so at most the epoch
  in flight is redone; Ray Train itself keeps no checkpoint (nothing is uploaded through it).

Either way rank 0 writes ``checkpoint.pt`` after every epoch (the one checkpoint format: model,
optimizer, loop state, the trajectory recorder merged over the ranks) and publishes ``model.pt``; every
worker holds the route's samples (L-FT: the backbone features the attribution pass kept) and trains on
its rank's stride of each epoch's permutation in batches of batch_size / workers
(`raypipe.stages.train.route_data`): the same global batches, learning rate and data order as in one
process.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train.torch import TorchTrainer

from raypipe import layout, storage
from raypipe.distributed.resources import Plan
from raypipe.errors import TrainingDiverged, user_errors_unwrapped
from raypipe.stages.data import train_format
from raypipe.stages.train import (
    TrainRequest,
    Worker,
    route_data,
    route_size,
    route_summary,
    train_route,
)
from raypipe.storage import absolute
from raypipe.training.loop import EpochData, resolve_device


def worker_data(request: TrainRequest, rank: int, world: int) -> tuple[EpochData, int]:
    """What this Ray worker trains on -> (data, samples of the route). (tests/faults wraps it in Ray
    workers to kill one mid-epoch.)"""
    return route_data(request, rank, world)


def run_worker(request: TrainRequest, worker: Worker, cpus: float) -> int:
    """One copy of the loop on this Ray worker -> the number of samples the route trains on."""
    torch.set_num_threads(max(1, int(cpus)))
    data, n_train = worker_data(request, worker.rank, worker.world)
    train_route(request, data, *train_format(request.data_uri), worker)
    return n_train


def _route_task(request_dict: dict[str, Any], cpus: float, device: str, started_at: float) -> dict[str, Any]:
    """A one-worker route, whole: train (or resume), publish, score on the test split -> the stage summary."""
    request = TrainRequest.from_dict(request_dict)
    n_train = run_worker(request, Worker(resolve_device(device)), cpus)
    return route_summary(request, n_train, started_at, num_workers=1)


def _gather(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def quiet_train_reports() -> None:
    """Ray Train logs a line per worker at every `ray.train.report` ("Reporting training result ..."), the whole
    metrics dict; rank 0's own per-epoch line (`raypipe.training.callbacks.Log`) says what matters. Ray's supported
    settings do not reach that line (Ray 2.60): its logger is named by its file, not under ``ray.train``, so
    `ray.train.LoggingConfig` leaves it alone, and Ray Train sets its workers' root logger to INFO after
    `ray.init(logging_config=...)` has set it. Hence its level here, and nothing else changed."""
    with contextlib.suppress(Exception):  # a Ray without that module has no such line
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)  # Ray names that logger by its file


def _console(line: str) -> None:
    """One line to this worker's stdout, which Ray forwards to the driver. Not `print`: Ray Train patches it to
    log every line once more (each per-epoch line would show twice)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: its place among the ranks, then the one loop."""
    quiet_train_reports()
    request = TrainRequest.from_dict(config["request"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    relay = config.get("relay")

    def report(metrics: dict[str, Any]) -> None:
        if relay is not None and rank == 0:
            relay.put(metrics)
        ray.train.report(metrics)

    device = ray.train.torch.get_device()
    wrap, gather = ray.train.torch.prepare_model, _gather if world > 1 else None
    worker = Worker(device, rank, world, wrap, gather, report, log=_console)
    try:
        run_worker(request, worker, config["cpus_per_worker"])
    except TrainingDiverged as e:  # every rank stops at the same epoch; a restarted group would diverge again
        if rank == 0:
            storage.write_json(layout.failure_file(request.out_uri), {"error": str(e)})


class _Trainer(TorchTrainer):
    """Ctrl-C during `fit`: Ray Train's own handler aborts the run and then exits the process with status 1
    and no word (and stays installed after `fit`); this one tells the controller to stop the workers and
    raises KeyboardInterrupt, which the CLI turns into one line and exit status 130. (Ray Train registers
    it only from the main thread; routes running side by side are in other threads, where Ctrl-C reaches
    the runner's main thread instead.)"""

    def _register_sigint_handler(self, controller) -> None:
        def interrupted(signum, frame):
            with contextlib.suppress(Exception):
                controller.abort.remote()
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, interrupted)


def _fit(trainer: TorchTrainer, out_uri: str) -> None:
    """`trainer.fit()`, with the SIGINT handler restored after it, a worker's RaypipeError raised as itself,
    and a route every worker stopped (a diverged loss) raised as the TrainingDiverged it was."""
    failure = layout.failure_file(out_uri)
    storage.remove_tree(failure)
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main else None
    try:
        with user_errors_unwrapped():
            trainer.fit()
    finally:
        if main:
            signal.signal(signal.SIGINT, handler)
    stopped = storage.read_json_or_none(failure)
    if stopped is not None:
        storage.remove_tree(failure)
        raise TrainingDiverged(stopped.get("error", "the training stopped on every worker"))


def train_on_ray(
    request: TrainRequest,
    plan: Plan,
    max_failures: int,
    log: Callable[[str], None] = print,
    placement: dict[str, float] | None = None,
    relay=None,
) -> dict[str, Any]:
    """Run `request` on `plan.num_workers` workers -> the same summary as in-process.

    `placement`: custom resources each worker asks for on top of CPU / GPU (`ray.worker_resource`),
    which confines the workers to the nodes that declare them. `relay`: a Ray queue that rank 0 also
    puts every epoch's metrics in (a Tune trial drains it into `tune.report`; Ray Train workers only).
    """
    started_at = time.time()
    in_task = plan.num_workers == 1 and relay is None
    where = "a Ray task" if in_task else f"{plan.num_workers} Ray Train workers"
    gpu = f" + {plan.gpus_per_worker:g} GPU" if plan.use_gpu else ""
    log(f"[{request.route}] training: {where}, {plan.cpus_per_worker:g} CPU{gpu} each, {request.train.epochs} epochs")
    if in_task:
        task = ray.remote(_route_task).options(
            num_cpus=plan.cpus_per_worker,
            num_gpus=plan.gpus_per_worker if plan.use_gpu else 0,
            resources=placement or {},
            max_retries=max_failures,  # the worker process died: run again, from checkpoint.pt
        )
        device = "cuda" if plan.use_gpu else "cpu"
        with user_errors_unwrapped():  # a diverged loss, a damaged file: the task's RaypipeError as itself
            return ray.get(task.remote(request.to_dict(), plan.cpus_per_worker, device, started_at))
    trainer = _Trainer(
        train_loop_per_worker,
        train_loop_config={"request": request.to_dict(), "cpus_per_worker": plan.cpus_per_worker, "relay": relay},
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan.num_workers,
            use_gpu=plan.use_gpu,
            resources_per_worker={
                "CPU": plan.cpus_per_worker,
                **({"GPU": plan.gpus_per_worker} if plan.use_gpu else {}),
                **(placement or {}),
            },
        ),
        run_config=ray.train.RunConfig(
            # A fresh Ray Train run at each start: the stage's checkpoint.pt is what resumes it.
            name=f"{request.route}-{int(time.time() * 1000)}",
            storage_path=absolute(layout.ray_train_dir(request.out_uri)),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            # Ray Train's own `ray.train` lines (the controller's worker group starting, running, finishing: about
            # 8 a route) stay in Ray's session log files; raypipe's per-epoch line says what matters.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    _fit(trainer, request.out_uri)
    return route_summary(request, route_size(request), started_at, num_workers=plan.num_workers)
