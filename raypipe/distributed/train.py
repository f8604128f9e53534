"""Ray Train for every training stage: the one training loop (`raypipe.stages.train.train_route`) on
every worker, data-parallel.

Each worker trains a DistributedDataParallel copy (gloo on CPU, nccl on GPU, chosen by Ray Train) on
its share of the training set, and rank 0 writes the stage's ``checkpoint.pt`` after every epoch
(the one checkpoint format: model, optimizer, loop state, the trajectory recorder merged over the
ranks). On a worker failure Ray Train restarts the group (`FailureConfig(max_failures)`) and every
worker resumes from that file, so at most the epoch in flight is redone; Ray Train itself keeps no
checkpoint. At the end rank 0 publishes ``model.pt``; the driver evaluates it on the test split.

Where the data comes from (`ingest`):
- "ray_data" (the pipeline's routes): this worker's shard of a Ray Dataset over the training Parquet
  (only the clean part after the partition), streamed; kept in memory after the first epoch when it
  fits `cache_bytes` (each fresh Ray Data pass costs seconds of start-up) and then reshuffled per epoch;
- "memory" (a sweep trial's fine-tuning): every worker reads the clean part and takes its rank's
  stride of one global permutation per epoch, so a trial never waits on Ray Data tasks.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train.torch import TorchTrainer

from raypipe import layout, storage
from raypipe.data import batch_from_table
from raypipe.distributed.resources import Plan
from raypipe.errors import TrainingDiverged, user_errors_unwrapped
from raypipe.stages.data import train_shards
from raypipe.stages.train import (
    TrainRequest,
    Worker,
    clean_ids,
    keep_ids,
    route_summary,
    train_route,
    training_samples,
)
from raypipe.storage import absolute, read_manifest
from raypipe.training.loop import InMemory


class WorkerShard:
    """This worker's part of the training set, streamed from Ray Data, epoch by epoch.

    The first epoch streams it; if it is at most `cache_bytes`, it is kept as tensors (with its
    sample ids) and later epochs reshuffle it in memory, seeded by epoch.
    """

    def __init__(self, shard, shape, batch_size: int, seed: int, cache_bytes: int):
        self.shard, self.shape, self.batch_size, self.seed = shard, tuple(shape), batch_size, seed
        self.cache_bytes = cache_bytes
        self.cache: tuple[np.ndarray, torch.Tensor, torch.Tensor] | None = None  # (ids, x, y)

    def _stream(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
        for table in self.shard.iter_batches(
            batch_size=self.batch_size,
            batch_format="pyarrow",
            local_shuffle_buffer_size=max(4 * self.batch_size, 1024),
            local_shuffle_seed=self.seed + epoch,
        ):
            b = batch_from_table(table, self.shape)
            yield torch.as_tensor(b["x"]), torch.as_tensor(b["label"]), b["sample_id"]

    def _first_pass(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        parts, size = [], 0
        for x, y, ids in self._stream(epoch):
            size += x.numel() * x.element_size()
            if size <= self.cache_bytes:
                parts.append((ids, x, y))
            yield x, y
        if size <= self.cache_bytes and parts:
            self.cache = (
                np.concatenate([p[0] for p in parts]),
                torch.cat([p[1] for p in parts]),
                torch.cat([p[2] for p in parts]),
            )

    def batches(self, epoch: int):
        if self.cache is None:
            return self._first_pass(epoch)
        ids, x, y = self.cache
        return InMemory(x, y, ids, self.batch_size, self.seed).batches(epoch)

    def held(self):
        return self.cache


def _gather(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: its data, its place among the ranks, then the one loop."""
    request = TrainRequest.from_dict(config["request"])
    torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    batch_size = request.train.batch_size
    if config["ingest"] == "memory":
        train = training_samples(request)
        data = InMemory.from_arrays(
            train.x, train.label, train.sample_id, batch_size, request.seed, rank=rank, world=world
        )
    else:
        data = WorkerShard(
            ray.train.get_dataset_shard("train"),
            config["sample_shape"],
            batch_size,
            request.seed,
            config["cache_bytes"],
        )
    relay = config.get("relay")

    def report(metrics: dict[str, Any]) -> None:
        if relay is not None and rank == 0:
            relay.put(metrics)
        ray.train.report(metrics)

    worker = Worker(
        ray.train.torch.get_device(), rank, world, ray.train.torch.prepare_model, _gather if world > 1 else None, report
    )
    try:
        train_route(request, data, config["sample_shape"], config["num_classes"], worker)
    except TrainingDiverged as e:  # every rank stops at the same epoch; a restarted group would diverge again
        if rank == 0:
            storage.write_json(layout.failure_file(request.out_uri), {"error": str(e)})


class _Trainer(TorchTrainer):
    """Ctrl-C during `fit`: Ray Train's own handler aborts the run and then exits the process with status 1
    and no word (and stays installed after `fit`); this one tells the controller to stop the workers and
    raises KeyboardInterrupt, which the CLI turns into one line and exit status 130."""

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
    cache_mb: int,
    log: Callable[[str], None] = print,
    placement: dict[str, float] | None = None,
    ingest: str = "ray_data",
    relay=None,
) -> dict[str, Any]:
    """Run `request` on a TorchTrainer of `plan.num_workers` workers -> the same summary as in-process.

    `placement`: custom resources each worker asks for on top of CPU / GPU (`ray.worker_resource`),
    which confines the workers to the nodes that declare them. `relay`: a Ray queue that rank 0 also
    puts every epoch's metrics in (a Tune trial drains it into `tune.report`).
    """
    started = time.perf_counter()
    data_summary = read_manifest(request.data_uri)["summary"]
    n_train = data_summary["rows"]["train"]
    datasets = {}
    if ingest == "ray_data":
        dataset = ray.data.read_parquet(train_shards(request.data_uri), shuffle=None)
        if request.route != "initial":
            ids = clean_ids(request.partition_uri)  # [n_clean] int64: 8 bytes a sample, shipped once per task
            n_train = len(ids)
            dataset = dataset.map_batches(keep_ids, fn_args=(ids,), batch_format="pyarrow")
        datasets = {"train": dataset}
    elif request.route != "initial":
        n_train = len(clean_ids(request.partition_uri))
    trainer = _Trainer(
        train_loop_per_worker,
        train_loop_config={
            "request": request.to_dict(),
            "sample_shape": data_summary["sample_shape"],
            "num_classes": data_summary["num_classes"],
            "cpus_per_worker": plan.cpus_per_worker,
            "cache_bytes": cache_mb * 2**20,
            "ingest": ingest,
            "relay": relay,
        },
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
        ),
        datasets=datasets,
    )
    log(
        f"[{request.route}] Ray Train: {plan.num_workers} workers x {plan.cpus_per_worker:g} CPU"
        + (" + 1 GPU" if plan.use_gpu else "")
        + f", {request.train.epochs} epochs on {n_train} samples"
    )
    _fit(trainer, request.out_uri)
    return route_summary(request, n_train, started, num_workers=plan.num_workers)
