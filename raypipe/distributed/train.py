"""Ray Train for every route: the same `train_epoch` as in-process, data-parallel over workers.

Each worker reads its shard of the training set through Ray Data (`get_dataset_shard`), trains a
DistributedDataParallel copy (gloo on CPU, nccl on GPU, chosen by Ray Train), and reports every
epoch with a checkpoint (rank 0 writes it). On a worker failure Ray Train restarts the group
(`FailureConfig(max_failures)`) and the loop resumes from the latest checkpoint, so at most the
epoch in flight is redone. At the end rank 0 publishes ``model.pt`` under the route's directory;
the driver evaluates it on the clean test split.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from raypipe import storage
from raypipe.config import ModelConfig, TrainConfig
from raypipe.data import batch_from_table
from raypipe.distributed.resources import Plan
from raypipe.core.models import save_model
from raypipe.stages.data import read_split, train_shards
from raypipe.stages.train import TrainRequest, clean_ids, make_recorder, starting_model, write_trajectory
from raypipe.training.loop import (
    evaluate,
    make_optimizer,
    predict_logits,
    resolve_device,
    tensor_batches,
    train_epoch,
    trainable_parameters,
)

CKPT_FILE = "state.pt"

# Test hook (tests/test_reliability.py), inert unless set on the driver: RAYPIPE_TEST_KILL_WORKER=<route>:<epoch>:<dir>
# makes the last-rank Train worker of <route> exit abruptly (os._exit) after the first batch of <epoch> (1-based),
# once: it leaves <dir>/killed-<route> first, so the restarted worker group trains through. Every worker of that
# route appends "start <rank> <first epoch> <unix time>" and "epoch <rank> <epoch> <unix time>" lines to
# <dir>/<route>.log.
TEST_KILL_ENV = "RAYPIPE_TEST_KILL_WORKER"


def _request_from_dict(d: dict[str, Any]) -> TrainRequest:
    return TrainRequest(**{**d, "train": TrainConfig(**d["train"]), "model": ModelConfig(**d["model"])})


def _keep_ids(table: pa.Table, ids: np.ndarray) -> pa.Table:
    return table.filter(pc.is_in(table["sample_id"], value_set=pa.array(ids)))


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    request = _request_from_dict(loop_config["request"])
    shape, num_classes = tuple(loop_config["sample_shape"]), loop_config["num_classes"]
    torch.set_num_threads(max(1, int(loop_config["cpus_per_worker"])))
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()

    model, signature = starting_model(request, shape, num_classes)
    params = trainable_parameters(model, request.route)  # before DDP wraps it: freezes the l_ft backbone
    model = ray.train.torch.prepare_model(model)
    optimizer = make_optimizer(params, request.train)

    start_epoch, seconds_train = 0, 0.0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restarted worker group: resume after the last finished epoch
        with checkpoint.as_directory() as ckpt_dir:
            state = torch.load(os.path.join(ckpt_dir, CKPT_FILE), map_location="cpu", weights_only=True)
        _unwrap(model).load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        start_epoch, seconds_train = state["epoch"], state["seconds_train"]
    hook = _KillHook.parse(loop_config.get("test_kill"), request.route, rank, context.get_world_size())
    if hook is not None:
        hook.log(f"start {rank} {start_epoch + 1}")

    shard = ray.train.get_dataset_shard("train")
    data = _WorkerShard(shard, shape, request, loop_config["cache_bytes"])
    recorder = None
    for epoch in range(start_epoch, request.train.epochs):
        start = time.perf_counter()
        batches = data.batches(epoch)
        if hook is not None:
            batches = hook.wrap(batches, epoch + 1)
        metrics = train_epoch(model, batches, optimizer, request.route, device)
        elapsed = time.perf_counter() - start
        seconds_train += elapsed
        if epoch < request.trajectory_epochs and "x" in data.cache:  # end-of-epoch eval pass, this worker's shard
            if recorder is None:
                recorder = make_recorder(request, data.cache["ids"].numpy())
            logits = predict_logits(_unwrap(model), data.cache["x"].numpy(), 1024, device)
            recorder.update(data.cache["ids"].numpy(), logits, data.cache["y"].numpy(), epoch + 1)
            model.train()
        metrics = {**metrics, "epoch": epoch + 1, "seconds": elapsed, "seconds_train": seconds_train}
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                state = {
                    "model_state": _unwrap(model).state_dict(),
                    "optimizer_state": optimizer.state_dict(),
                    "epoch": epoch + 1,
                    "seconds_train": seconds_train,
                }
                torch.save(state, os.path.join(tmp, CKPT_FILE))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            else:
                ray.train.report(metrics)
    if recorder is not None:  # each worker publishes its shard's trajectory; the partition stage joins them
        write_trajectory(request.out_uri, recorder, request.early_loss_epoch, part=rank)
    if rank == 0:
        save_model(storage.join(request.out_uri, "model.pt"), _unwrap(model).cpu(), signature)


class _WorkerShard:
    """This worker's part of the training set, epoch by epoch.

    The first epoch streams the shard from Ray Data; if the shard is at most `cache_bytes`, it is
    kept as tensors (with its sample ids) and later epochs reshuffle it in memory, seeded by epoch.
    """

    def __init__(self, shard, shape, request: TrainRequest, cache_bytes: int):
        self.shard, self.shape, self.request, self.cache_bytes = shard, shape, request, cache_bytes
        self.cache: dict[str, torch.Tensor] = {}

    def _stream(self, epoch: int):
        batch_size = self.request.train.batch_size
        for table in self.shard.iter_batches(
            batch_size=batch_size,
            batch_format="pyarrow",
            local_shuffle_buffer_size=max(4 * batch_size, 1024),
            local_shuffle_seed=self.request.seed + epoch,
        ):
            b = batch_from_table(table, self.shape)
            yield torch.as_tensor(b["x"]), torch.as_tensor(b["label"]), torch.as_tensor(b["sample_id"])

    def _first_pass(self, epoch: int):
        parts, size = [], 0
        for x, y, ids in self._stream(epoch):
            size += x.numel() * x.element_size()
            if size <= self.cache_bytes:
                parts.append((x, y, ids))
            yield x, y
        if size <= self.cache_bytes and parts:
            for key, i in (("x", 0), ("y", 1), ("ids", 2)):
                self.cache[key] = torch.cat([p[i] for p in parts])

    def batches(self, epoch: int):
        if "x" in self.cache:
            generator = torch.Generator().manual_seed(self.request.seed + epoch)
            return tensor_batches(self.cache["x"], self.cache["y"], self.request.train.batch_size, True, generator)
        return self._first_pass(epoch)


class _KillHook:
    """The TEST_KILL_ENV test hook, for one worker of the route it names (None for every other route)."""

    def __init__(self, epoch: int, directory: str, route: str, rank: int, is_victim: bool):
        self.epoch, self.directory, self.route, self.rank, self.is_victim = epoch, directory, route, rank, is_victim
        self.marker = os.path.join(directory, f"killed-{route}")

    @classmethod
    def parse(cls, spec: str | None, route: str, rank: int, world_size: int) -> _KillHook | None:
        if not spec:
            return None
        target, epoch, directory = spec.split(":", 2)
        return cls(int(epoch), directory, route, rank, rank == world_size - 1) if target == route else None

    def log(self, line: str) -> None:
        with open(os.path.join(self.directory, f"{self.route}.log"), "a") as f:
            f.write(f"{line} {time.time():.3f}\n")

    def wrap(self, batches, epoch: int):
        self.log(f"epoch {self.rank} {epoch}")
        if epoch != self.epoch or not self.is_victim or os.path.exists(self.marker):
            return batches
        return self._die_after_first(batches)

    def _die_after_first(self, batches):
        for batch in batches:
            yield batch
            break
        with open(self.marker, "w") as f:
            f.write(f"rank {self.rank} killed in epoch {self.epoch}\n")
        # Wait until the controller has collected the last epoch's report (it polls the workers every
        # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), so the restart resumes from that epoch's checkpoint.
        deadline = time.monotonic() + 30.0
        try:
            from ray.train.v2._internal.execution.context import get_train_context

            queue = get_train_context().get_result_queue()
            while not queue.empty() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)  # the rest of that poll round (rank 0's report holds the checkpoint)
        except Exception:  # another Train version: give the controller a few polls instead
            time.sleep(5.0)
        os._exit(1)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def train_on_ray(
    request: TrainRequest,
    plan: Plan,
    data_summary: dict[str, Any],
    max_failures: int,
    cache_mb: int,
    log=print,
    placement: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Run `request` on a TorchTrainer; return the same metrics as `train_local`.

    `placement`: custom resources each worker asks for on top of CPU / GPU (`ray.worker_resource`),
    which confines the workers to the nodes that declare them.
    """
    from raypipe.core.models import load_model

    start = time.perf_counter()
    dataset = ray.data.read_parquet(train_shards(request.data_uri), shuffle=None)
    n_train = data_summary["rows"]["train"]
    if request.route != "initial":
        ids = clean_ids(request.partition_uri)  # [n_clean] int64: 8 bytes a sample, shipped once per task
        n_train = len(ids)
        dataset = dataset.map_batches(_keep_ids, fn_args=(ids,), batch_format="pyarrow")
    storage_path = storage.absolute(storage.join(request.out_uri, "ray_train"))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "request": dataclasses.asdict(request),
            "sample_shape": data_summary["sample_shape"],
            "num_classes": data_summary["num_classes"],
            "cpus_per_worker": plan.cpus_per_worker,
            "cache_bytes": cache_mb * 2**20,
            "test_kill": os.environ.get(TEST_KILL_ENV),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan.num_workers,
            use_gpu=plan.use_gpu,
            resources_per_worker={
                "CPU": plan.cpus_per_worker,
                **({"GPU": 1.0} if plan.use_gpu else {}),
                **(placement or {}),
            },
        ),
        run_config=ray.train.RunConfig(
            name=request.route,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": dataset},
    )
    log(
        f"[{request.route}] Ray Train: {plan.num_workers} workers x {plan.cpus_per_worker:g} CPU"
        + (" + 1 GPU" if plan.use_gpu else "")
        + f", {request.train.epochs} epochs on {n_train} samples"
    )
    result = trainer.fit()
    last = result.metrics or {}
    model, _, _ = load_model(storage.join(request.out_uri, "model.pt"))
    test = read_split(request.data_uri, "test")
    metrics = evaluate(model, test.x, test.label, resolve_device("cpu"))
    epochs = int(last.get("epoch", request.train.epochs))
    return {
        **metrics,
        "seconds_per_epoch": float(last.get("seconds_train", 0.0)) / max(epochs, 1),
        "seconds_train": float(last.get("seconds_train", 0.0)),
        "seconds_total": time.perf_counter() - start,
        "epochs": epochs,
        "n_train": int(n_train),
        "train_accuracy_given_labels": float(last.get("train_accuracy", float("nan"))),
        "num_workers": plan.num_workers,
    }
