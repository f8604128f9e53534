"""The Ray executor (`raypipe.stages.Executor`): the same stage functions as `LocalExecutor`, spread over a
Ray cluster.

- attribution: a Ray task per pending data shard, at most `max_actors` at a time, each worker process
  loading the model once; on GPUs an actor per GPU (`raypipe.distributed.shards`, which says why).
  Each shard is streamed from Parquet and its output published atomically, so finished shards
  survive any failure and a rerun computes only the rest (shards are the unit of resumable work);
- map: per-shard tasks (the mixture's fit sample, scoring, the sensitivity sums) on the same warm
  worker processes; only their small results travel to the driver;
- train: the one training loop in a Ray task (one worker) or on Ray Train workers (several):
  `raypipe.distributed.train`. The runner hands independent routes over together (from several
  threads, `concurrent_stages`); as many run side by side as fit on the cluster, each with its own
  workers (`resources.routes_at_once`), the others wait for a free slot.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

import ray

from raypipe.config import Config
from raypipe.distributed.resources import Plan, plan_resources, routes_at_once
from raypipe.distributed.shards import attribute_in_tasks, attribute_on_actors, run_bounded, warm_up
from raypipe.errors import RaypipeError, user_errors_unwrapped
from raypipe.preflight import unreachable
from raypipe.stages.attribution import AttributionPass
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
    try:
        ray.init(address=address, log_to_driver=True, logging_level="WARNING")
    except (ConnectionError, TimeoutError, ValueError, RuntimeError) as e:
        raise unreachable(address, (str(e).strip().splitlines() or [type(e).__name__])[0]) from None
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


def _call(fn: Callable[[Any], Any], threads: int, item: Any) -> Any:
    import torch  # the worker process may have run a training route with more threads before

    torch.set_num_threads(threads)
    return fn(item)


class RayExecutor:
    name = "ray"
    concurrent_stages = True

    def __init__(self, config: Config, log=print):
        self.config = config
        self.log = log
        init_ray(config.ray.address, log)
        self.placement = placement_resources(config.ray.worker_resource)
        nodes = schedulable_nodes(config.ray.worker_resource)
        self.plan: Plan = plan_resources(schedulable_resources(nodes), config.ray, nodes)
        self.routes_at_once = routes_at_once(self.plan, nodes)
        self.route_slots = threading.BoundedSemaphore(self.routes_at_once)
        log(
            f"[ray] plan: {self.plan}, {self.routes_at_once} route(s) at once"
            + (f", on nodes with '{config.ray.worker_resource}'" if self.placement else "")
        )
        # One worker process per attribution task starts and imports while the driver prepares the data;
        # the first route, the attribution and the per-shard tasks then run on them (`ready`).
        self.warming = warm_up(self.plan.max_actors, self.placement)

    def ready(self) -> None:
        """Wait (once, at most a minute) for the warm-up: a task sent before would start in a cold process."""
        if self.warming:
            ray.wait(self.warming, num_returns=len(self.warming), timeout=60.0)
            self.warming = []

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], desc: str = "") -> list[Any]:
        self.ready()
        items = list(items)
        remote = ray.remote(_call).options(num_cpus=self.plan.cpus_per_task, resources=self.placement)
        fn_ref = ray.put(fn)  # once: the tasks read it from the object store (arrays without a copy)
        threads = max(1, int(self.plan.cpus_per_task))
        with user_errors_unwrapped():  # a task's RaypipeError (a damaged shard) as itself, not a RayTaskError
            return run_bounded(
                lambda item: remote.remote(fn_ref, threads, item), items, max(len(items), 1), desc, self.log
            )

    def attribute(self, spec: AttributionPass, jobs: list[tuple[str, str]]) -> int:
        if not jobs:
            return 0
        self.ready()
        plan = self.plan
        spec = dataclasses.replace(spec, device="cuda" if plan.use_gpu else "cpu")  # where the plan puts it
        n = max(1, min(plan.max_actors, len(jobs)))
        with user_errors_unwrapped():
            if plan.use_gpu:
                return attribute_on_actors(spec, jobs, n, plan.cpus_per_actor, plan.gpus_per_actor, self.placement)
            return attribute_in_tasks(spec, jobs, n, plan.cpus_per_actor, self.placement, self.log)

    def train(self, request: TrainRequest) -> dict[str, Any]:
        """One route on its own workers, once a slot is free (called from several threads at once)."""
        from raypipe.distributed.train import train_on_ray

        self.ready()
        with self.route_slots:
            return train_on_ray(request, self.plan, self.config.ray.max_failures, self.log, placement=self.placement)

    def close(self) -> None:
        pass  # the cluster outlives the job; a local Ray started here ends with the process
