"""Sizing actors, tasks and Train workers from what the cluster has, so nothing waits forever.

The attribution actors run alone, one per CPU (or GPU). A training route takes `num_workers` workers
of `cpus_per_worker` CPUs (and a GPU each when there are GPUs); together they hold at most all CPUs
but one (half of a tiny machine), so a worker group never takes every CPU from the tasks beside it.
Independent routes run side by side as long as they fit (`routes_at_once`), each with its own
workers. Given the nodes, the plan must also fit node by node: the cluster's total can hide that no
single node has the CPUs one worker asks for (4 one-CPU nodes: workers of 1.5 CPUs never start).
Pure arithmetic on resource dicts: unit-tested without a cluster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from raypipe.config import RayConfig
from raypipe.errors import ConfigError, RaypipeError


@dataclass(frozen=True)
class Plan:
    use_gpu: bool
    # Attribution: tasks (actors on GPUs) at once, and what each holds.
    max_actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    # Generic per-shard tasks (fit sample, scoring, sufficient statistics).
    cpus_per_task: float
    # Training: workers per route (1: a Ray task, more: Ray Train), and what each holds.
    num_workers: int
    cpus_per_worker: float
    gpus_per_worker: float


def plan_resources(resources: dict[str, float], cfg: RayConfig, nodes: list[dict[str, float]] | None = None) -> Plan:
    """`resources` is ray.cluster_resources(): {"CPU": 2.0, "GPU": 0.0, ...}; `nodes` the alive nodes'
    resources ([{"CPU": 1.0, "GPU": 0.0}, ...]) the work may use, when known."""
    plan = _plan_from_totals(resources, cfg)
    return plan if not nodes else _fit_to_nodes(plan, nodes, fixed_workers=cfg.num_workers > 0)


def _packs(node_cpus: list[float], n_workers: int, per_worker: float, reserve: float) -> bool:
    """Can `n_workers` of `per_worker` CPUs each be placed on nodes with `node_cpus` free CPUs, one
    node still keeping `reserve` CPUs for other tasks? (Each worker goes to the node with the most free.)"""
    free = sorted(node_cpus, reverse=True)
    for _ in range(n_workers):
        free.sort(reverse=True)
        if free[0] + 1e-9 < per_worker:
            return False
        free[0] -= per_worker
    return max(free) + 1e-9 >= reserve


def _fit_to_nodes(plan: Plan, nodes: list[dict[str, float]], fixed_workers: bool) -> Plan:
    if plan.use_gpu:
        # A GPU worker / actor takes its CPUs on its GPU's node: share what each GPU node has left
        # after one CPU (half, on a one-CPU node) is kept for other tasks.
        gpu_nodes = [n for n in nodes if n.get("GPU", 0.0) >= 1]
        share = min(max(n["CPU"] - 1.0, n["CPU"] / 2) / int(n["GPU"]) for n in gpu_nodes) if gpu_nodes else 1.0
        return replace(
            plan,
            cpus_per_worker=min(plan.cpus_per_worker, share),
            cpus_per_actor=min(plan.cpus_per_actor, share),
        )
    node_cpus = [float(n.get("CPU", 0.0)) for n in nodes if n.get("CPU", 0.0) > 0]
    reserve = min(1.0, max(node_cpus) / 2)
    cpus_per_actor = min(plan.cpus_per_actor, max(node_cpus))
    num_workers, per_worker = plan.num_workers, plan.cpus_per_worker
    while True:
        candidate = per_worker
        while candidate >= 0.1:
            if _packs(node_cpus, num_workers, candidate, reserve):
                return replace(plan, num_workers=num_workers, cpus_per_worker=candidate, cpus_per_actor=cpus_per_actor)
            candidate *= 0.75
        if fixed_workers or num_workers == 1:
            raise RaypipeError(
                f"ray.num_workers={num_workers} Train workers do not fit on the cluster's nodes (CPUs per node: "
                f"{sorted(node_cpus, reverse=True)}) with a CPU left for other tasks; lower ray.num_workers or set it "
                "to 0 (size from the cluster)"
            )
        num_workers -= 1


def routes_at_once(plan: Plan, nodes: list[dict[str, float]]) -> int:
    """How many training routes of `plan` fit on `nodes` side by side, each with its own
    `plan.num_workers` workers (at least 1: the others wait for one to finish)."""
    if plan.use_gpu:
        gpus = sum(int(n.get("GPU", 0.0) // max(plan.gpus_per_worker, 1e-9)) for n in nodes)
        return max(1, gpus // plan.num_workers)
    node_cpus = [float(n.get("CPU", 0.0)) for n in nodes if n.get("CPU", 0.0) > 0]
    routes = 1
    while node_cpus and _packs(node_cpus, (routes + 1) * plan.num_workers, plan.cpus_per_worker, 0.0):
        routes += 1
    return routes


def _plan_from_totals(resources: dict[str, float], cfg: RayConfig) -> Plan:
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
        # Leave one CPU for other tasks; share the rest between the GPU workers / actors.
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


# ---------------------------------------------------------------------------------------------
# A sweep's trials.


@dataclass(frozen=True)
class SweepPlan:
    # What Tune reserves for the trial function: the whole trial when it trains in-process, only the
    # driver's share when it starts Ray Train workers (which reserve their own).
    trial_resources: dict[str, float]
    max_concurrent: int
    workers: int  # Ray Train workers per trial; 1 = fine-tune in the trial's own process
    cpus_per_worker: float
    gpus_per_worker: float

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0 or self.trial_resources.get("gpu", 0.0) > 0


def plan_sweep(resources: dict[str, float], cfg, n_trials: int) -> SweepPlan:
    """Concurrent trials and each trial's resources from ray.cluster_resources() and the `sweep:` section."""
    cpus, gpus = float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))
    if cfg.cpus_per_trial > cpus + 1e-9:
        raise ConfigError(
            f"config key 'sweep.cpus_per_trial': {cfg.cpus_per_trial} is more than the cluster's {cpus:g} CPUs; "
            "lower it (fractions such as 0.5 work)"
        )
    if cfg.gpus_per_trial > 0 and cfg.gpus_per_trial > gpus + 1e-9:
        raise ConfigError(
            f"config key 'sweep.gpus_per_trial': {cfg.gpus_per_trial} but the cluster has {gpus:g} GPUs; "
            "set sweep.gpus_per_trial=0 or lower it"
        )
    fit = math.floor(cpus / cfg.cpus_per_trial + 1e-9)
    if cfg.gpus_per_trial > 0:
        fit = min(fit, math.floor(gpus / cfg.gpus_per_trial + 1e-9))
    max_concurrent = cfg.max_concurrent_trials or fit
    max_concurrent = max(1, min(max_concurrent, fit, max(n_trials, 1)))
    w = cfg.workers_per_trial
    if w == 1:
        trial = {"cpu": cfg.cpus_per_trial, **({"gpu": cfg.gpus_per_trial} if cfg.gpus_per_trial else {})}
        return SweepPlan(trial, max_concurrent, 1, 0.0, 0.0)
    # The trial function only drives Ray Train (and partitions / prunes, which are light): a fifth of
    # the trial's CPUs, at most half a CPU; its workers share the rest, so trials never starve each other.
    driver = round(min(0.5, 0.2 * cfg.cpus_per_trial), 4)
    per_worker = round((cfg.cpus_per_trial - driver) / w, 4)
    return SweepPlan({"cpu": driver}, max_concurrent, w, per_worker, round(cfg.gpus_per_trial / w, 4))
