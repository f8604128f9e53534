"""plan_resources: actor / task / training-worker sizing from the cluster's totals and, when known, node by
node; routes_at_once: how many training routes run side by side."""

from __future__ import annotations

import pytest

from raypipe.config import RayConfig
from raypipe.distributed.resources import _packs, plan_resources, routes_at_once
from raypipe.errors import RaypipeError


def _fits(plan, nodes) -> bool:
    """Every Train worker placed on some node, and one node keeps room for another task."""
    cpus = [n["CPU"] for n in nodes]
    return _packs(cpus, plan.num_workers, plan.cpus_per_worker, min(1.0, max(cpus) / 2))


def test_two_cpu_machine_leaves_a_cpu_and_runs_two_routes_side_by_side():
    nodes = [{"CPU": 2.0, "GPU": 0.0}]
    plan = plan_resources({"CPU": 2.0}, RayConfig(), nodes)
    assert plan.num_workers == 1 and plan.cpus_per_worker == 1.0 and not plan.use_gpu
    assert plan.max_actors == 2 and plan.cpus_per_actor == 1.0
    assert routes_at_once(plan, nodes) == 2  # one CPU each


def test_routes_at_once_packs_whole_routes_node_by_node():
    from dataclasses import replace

    nodes = [{"CPU": 2.0, "GPU": 0.0}] * 3
    plan = plan_resources({"CPU": 6.0}, RayConfig(num_workers=2), nodes)
    assert (plan.num_workers, plan.cpus_per_worker) == (2, 2.0)
    assert routes_at_once(plan, nodes) == 1  # 3 nodes hold 3 such workers: one route of 2, not two
    # Routes of one 1.5-CPU worker on 2-CPU nodes: one per node (3), not the totals' 6 / 1.5 = 4.
    assert routes_at_once(replace(plan, num_workers=1, cpus_per_worker=1.5), nodes) == 3
    assert routes_at_once(replace(plan, num_workers=1, cpus_per_worker=1.0), nodes) == 6
    # A route that takes more than any node has: still one at a time, never none.
    assert routes_at_once(replace(plan, num_workers=1, cpus_per_worker=8.0), nodes) == 1


def test_routes_at_once_with_gpus_is_gpus_over_workers():
    nodes = [{"CPU": 16.0, "GPU": 4.0}, {"CPU": 16.0, "GPU": 4.0}]
    plan = plan_resources({"CPU": 32.0, "GPU": 8.0}, RayConfig(num_workers=2, max_actors=2), nodes)
    assert plan.use_gpu and routes_at_once(plan, nodes) == 4
    single = plan_resources({"CPU": 16.0, "GPU": 1.0}, RayConfig(), [{"CPU": 16.0, "GPU": 1.0}])
    assert single.num_workers == 1 and routes_at_once(single, [{"CPU": 16.0, "GPU": 1.0}]) == 1


def test_totals_alone_would_ask_more_cpus_than_any_node_has():
    """4 one-CPU nodes: from the totals, 2 workers of 1.5 CPUs (never scheduled); node by node they fit."""
    nodes = [{"CPU": 1.0, "GPU": 0.0}] * 4
    totals = {"CPU": 4.0, "GPU": 0.0}
    from_totals = plan_resources(totals, RayConfig())
    assert from_totals.cpus_per_worker == 1.5 and not _fits(from_totals, nodes)
    plan = plan_resources(totals, RayConfig(), nodes)
    assert plan.num_workers == 2 and plan.cpus_per_worker <= 1.0 and _fits(plan, nodes)
    assert plan.cpus_per_actor <= 1.0


def test_workers_shrink_until_they_pack_with_room_for_ray_data():
    # 3 nodes of 2 CPUs: totals say 3 workers x 5/3 CPUs; only 1.5 each leaves a node with 0.5...
    nodes = [{"CPU": 2.0, "GPU": 0.0}] * 3
    plan = plan_resources({"CPU": 6.0}, RayConfig(), nodes)
    assert plan.num_workers == 3 and _fits(plan, nodes)
    assert plan.cpus_per_worker <= 1.0 + 1e-9  # one node keeps a whole CPU


def test_fixed_num_workers_that_cannot_fit_is_refused():
    nodes = [{"CPU": 1.0, "GPU": 0.0}] * 2
    with pytest.raises(RaypipeError, match=r"ray.num_workers=40 Train workers do not fit .*lower ray.num_workers"):
        plan_resources({"CPU": 2.0}, RayConfig(num_workers=40), nodes)


def test_gpu_workers_take_their_cpus_from_their_own_node():
    """One 8-GPU node with 8 CPUs and a CPU-only head with 32: totals would give each GPU worker 4 CPUs."""
    nodes = [{"CPU": 32.0, "GPU": 0.0}, {"CPU": 8.0, "GPU": 8.0}]
    totals = {"CPU": 40.0, "GPU": 8.0}
    assert plan_resources(totals, RayConfig()).cpus_per_worker == 4.0
    plan = plan_resources(totals, RayConfig(), nodes)
    assert plan.use_gpu and plan.num_workers == 8 and plan.gpus_per_worker == 1.0
    assert plan.cpus_per_worker == pytest.approx(7 / 8) and plan.cpus_per_actor == pytest.approx(7 / 8)
