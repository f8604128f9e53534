"""The Ray executor (`raypipe.stages.Executor`): the same stage functions as `LocalExecutor`, spread over a
Ray cluster.

- attribution: a Ray Dataset with one row per pending data shard, `map_batches` on an actor pool
  (`ActorPoolStrategy(min_size, max_size)`), one model per actor loaded once from its checkpoint
  URI, a GPU per actor when the cluster has GPUs. Each actor streams its shard from Parquet and
  publishes the shard's output atomically, so finished shards survive any failure and a rerun
  computes only the rest (shards, not Ray's internal blocks, are the unit of resumable work);
- map: per-shard tasks (the mixture's fit sample, scoring, the sensitivity sums); only their small
  results travel to the driver;
- train: Ray Train (raypipe.distributed.train), running the one training loop on every worker.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import ray

from raypipe.config import Config
from raypipe.distributed.resources import Plan, plan_resources
from raypipe.errors import RaypipeError
from raypipe.stages.attribution import ShardAttributor
from raypipe.stages.train import TrainRequest

# What each actor, task and Train worker asks of `ray.worker_resource`: a token amount, so a node
# declaring 1 unit of it holds up to 100 of them; CPUs and GPUs stay the real limits.
WORKER_RESOURCE_AMOUNT = 0.01


def init_ray(address: str | None, log=print) -> None:
    """Join the cluster this job runs on (RAY_ADDRESS / ray job submit), or start local Ray."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Ray Train V2's controller collects each epoch's report when it polls the workers (every 2 s by
    # default), and report() is a barrier: with short epochs that poll dominated the wall time.
    # Ray Train passes this variable from the driver to its controller and workers, on any cluster.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    ray.init(address=address, log_to_driver=True, logging_level="WARNING")
    log(f"[ray] connected: {ray.cluster_resources()}")


def placement_resources(worker_resource: str | None) -> dict[str, float]:
    """Custom resources every actor / task / Train worker asks for: {} or {worker_resource: 0.01}."""
    return {worker_resource: WORKER_RESOURCE_AMOUNT} if worker_resource else {}


def schedulable_nodes(worker_resource: str | None) -> list[dict[str, float]]:
    """The CPUs and GPUs of each alive node the work may use: every node, or those declaring `worker_resource`."""
    nodes = []
    for node in ray.nodes():
        resources = node.get("Resources", {})
        if node.get("Alive") and (not worker_resource or resources.get(worker_resource, 0.0) >= WORKER_RESOURCE_AMOUNT):
            nodes.append({key: float(resources.get(key, 0.0)) for key in ("CPU", "GPU")})
    if worker_resource and not nodes:
        raise RaypipeError(
            f"ray.worker_resource='{worker_resource}' but no alive node of the cluster declares it; start the "
            f"worker nodes with `ray start ... --resources='{{\"{worker_resource}\": 1}}'` or unset ray.worker_resource"
        )
    return nodes


def schedulable_resources(nodes: list[dict[str, float]]) -> dict[str, float]:
    return {key: sum(n[key] for n in nodes) for key in ("CPU", "GPU")}


class _ShardActor:
    """Ray Data callable class: one model per actor; a batch = some (in_uri, out_uri) shard jobs."""

    def __init__(self, model_uri: str, rule: str, batch_size: int, device: str, probe_models: dict | None = None):
        self.attributor = ShardAttributor(model_uri, rule, batch_size, device, probe_models)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [self.attributor(str(i), str(o)) for i, o in zip(batch["in_uri"], batch["out_uri"], strict=True)]
        return {"out_uri": batch["out_uri"], "rows": np.asarray(rows, dtype=np.int64)}


def _call(fn: Callable[[Any], Any], item: Any) -> Any:
    return fn(item)


class RayExecutor:
    name = "ray"

    def __init__(self, config: Config, log=print):
        self.config = config
        self.log = log
        init_ray(config.ray.address, log)
        self.placement = placement_resources(config.ray.worker_resource)
        nodes = schedulable_nodes(config.ray.worker_resource)
        self.plan: Plan = plan_resources(schedulable_resources(nodes), config.ray, nodes)
        log(f"[ray] plan: {self.plan}" + (f", on nodes with '{config.ray.worker_resource}'" if self.placement else ""))

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], desc: str = "") -> list[Any]:
        items = list(items)
        remote = ray.remote(_call).options(num_cpus=self.plan.cpus_per_task, resources=self.placement)
        fn_ref = ray.put(fn)
        refs = [remote.remote(fn_ref, item) for item in items]
        start, done, last = time.perf_counter(), 0, 0.0
        pending = list(refs)
        while pending:  # progress while waiting; results come back in input order below
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=5.0)
            done += len(ready)
            now = time.perf_counter() - start
            if len(items) > 1 and (now - last > 5 or not pending):
                self.log(f"  {desc}: {done}/{len(items)} shards ({now:.1f} s)")
                last = now
        return ray.get(refs)

    def attribute(
        self,
        model_uri: str,
        jobs: list[tuple[str, str]],
        rule: str,
        batch_size: int,
        device: str,
        probe_models: dict[str, str] | None = None,
    ) -> int:
        if not jobs:
            return 0
        plan = self.plan
        n_actors = max(1, min(plan.max_actors, len(jobs)))
        device = "cuda" if plan.use_gpu else "cpu"
        jobs_ds = ray.data.from_items([{"in_uri": i, "out_uri": o} for i, o in jobs], override_num_blocks=len(jobs))
        out = jobs_ds.map_batches(
            _ShardActor,
            fn_constructor_kwargs={
                "model_uri": model_uri,
                "rule": rule,
                "batch_size": batch_size,
                "device": device,
                "probe_models": probe_models,
            },
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=n_actors),
            num_cpus=plan.cpus_per_actor,
            num_gpus=plan.gpus_per_actor,
            resources=self.placement,
        )
        rows = 0
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            rows += int(batch["rows"].sum())
        return rows

    def train(self, request: TrainRequest) -> dict[str, Any]:
        from raypipe.distributed.train import train_on_ray

        ray_cfg = self.config.ray
        return train_on_ray(
            request, self.plan, ray_cfg.max_failures, ray_cfg.worker_cache_mb, self.log, placement=self.placement
        )

    def close(self) -> None:
        pass  # the cluster outlives the job; a local Ray started here ends with the process
