"""Sizing actors, tasks and Train workers from what the cluster has, so nothing waits forever.

Ray Data and Ray Train share the cluster. A trainer whose workers hold every CPU starves the Ray
Data tasks that feed it, and both wait forever (seen on 2 CPUs). So the trainer always leaves at
least one CPU (or a share of one on tiny machines) to Ray Data, and workers take fractional CPUs
where the machine is small. Pure arithmetic on a resources dict: unit-tested without a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

from raypipe.config import RayConfig
from raypipe.errors import RaypipeError


@dataclass(frozen=True)
class Plan:
    use_gpu: bool
    # Attribution actor pool.
    max_actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    # Generic per-shard tasks (fit sample, scoring, sufficient statistics).
    cpus_per_task: float
    # Ray Train.
    num_workers: int
    cpus_per_worker: float
    gpus_per_worker: float


def plan_resources(resources: dict[str, float], cfg: RayConfig) -> Plan:
    """`resources` is ray.cluster_resources(): {"CPU": 2.0, "GPU": 0.0, ...}."""
    cpus = float(resources.get("CPU", 0.0))
    gpus = float(resources.get("GPU", 0.0))
    if cpus < 1:
        raise RaypipeError(f"the Ray cluster has {cpus} CPUs; raypipe needs at least 1")
    if cfg.use_gpu is True and gpus < max(cfg.max_actors, cfg.num_workers, 1):
        asked = max(cfg.max_actors, cfg.num_workers, 1)
        raise RaypipeError(
            f"config key 'ray.use_gpu': true needs {asked} GPU(s) (one per attribution actor / Train worker) but the "
            f"Ray cluster has {gpus:g}; run on a cluster with GPUs, or set ray.use_gpu=auto (GPUs when present) "
            "or false"
        )
    use_gpu = cfg.use_gpu is not False and gpus >= 1
    if use_gpu:
        max_actors = cfg.max_actors or int(gpus)
        num_workers = cfg.num_workers or int(gpus)
        if max_actors > gpus or num_workers > gpus:
            raise RaypipeError(
                f"asked for {max(max_actors, num_workers)} GPU actors/workers but the cluster has {int(gpus)} GPUs; "
                "lower ray.max_actors / ray.num_workers or set them to 0 (size from the cluster)"
            )
        # Leave one CPU for Ray Data; share the rest between the GPU workers / actors.
        spare = max(cpus - 1.0, 0.5)
        return Plan(
            True, max_actors, min(1.0, spare / max_actors), 1.0, 1.0, num_workers, min(4.0, spare / num_workers), 1.0
        )
    # CPU only: one actor per CPU for attribution (they run alone), and Train workers that
    # together hold at most cpus - 1 CPUs (half of a 2-CPU machine).
    max_actors = cfg.max_actors or max(1, int(cpus))
    num_workers = cfg.num_workers or max(1, min(int(cpus) // 2, 8))
    train_cpus = max(cpus - 1.0, cpus / 2)
    return Plan(
        False, max_actors, min(1.0, cpus / max_actors), 0.0, 1.0, num_workers, min(2.0, train_cpus / num_workers), 0.0
    )
