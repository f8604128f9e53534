"""A worker node lost while the attribution runs (one multi-node cluster for this module).

A head that runs no work (0 CPUs) and two worker nodes with 2 CPUs each, all on this machine. The
attribution of 40 shards runs as Ray tasks, 2 at a time; once a few shards are published, a node
where the model was loaded (a worker process of it ran a shard) is killed outright (no graceful
shutdown). Ray runs the tasks that were on it again on the surviving node (tasks are retried on
system failures), whose worker processes load the model for themselves, and a shard is published
only whole, so the result is complete: every sample_id exactly once, the same values as an
attribution without the failure.

The model is a tiny user model (model.name=user) whose forward pass sleeps when RP_SLOW_S is set, which
only the cluster's workers see: it keeps the work going long enough to lose a node in the middle. Each
worker process that builds the model records the node it runs on, so the test knows which node to take away.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from raypipe import storage
from raypipe.config import ModelConfig, load_config
from raypipe.core.models import build_model, model_signature
from raypipe.executors import LocalExecutor
from raypipe.stages import attribution as attribute
from raypipe.stages import data as prepare
from raypipe.tables import columns_from_table
from raypipe.training.checkpoint import save_model

pytestmark = [pytest.mark.ray, pytest.mark.slow]

N_ROWS, SHARD_ROWS = 400, 10  # 40 shards
RULE, BATCH = "grad_x_act_label", 2

SLOW_MODEL = '''
"""A small raypipe user model whose forward pass can be slowed down, and that notes where it runs."""
import os
import time

import torch
from torch import nn

from raypipe.core.models import ProbedModel


class Slow(nn.Module):
    def forward(self, x):
        time.sleep(float(os.environ.get("RP_SLOW_S", "0")))
        return x.flatten(1)


def make(input_shape, num_classes, probe_width):
    where = os.environ.get("RP_NODE_DIR")
    if where:  # inside a Ray worker: which node this process runs on
        import ray

        with open(os.path.join(where, f"process-{os.getpid()}"), "w") as f:
            f.write(ray.get_runtime_context().get_node_id())
    n = 1
    for s in input_shape:
        n *= s
    return ProbedModel(nn.Sequential(Slow(), nn.Linear(n, 24), nn.ReLU()), 24, probe_width, num_classes)
'''


@pytest.fixture(scope="module")
def slow_model_package(tmp_path_factory):
    root = tmp_path_factory.mktemp("pkg")
    (root / "rp_slow_model").mkdir()
    (root / "rp_slow_model" / "__init__.py").write_text(SLOW_MODEL)
    return root


@pytest.fixture(scope="module")
def cluster(slow_model_package, tmp_path_factory):
    from ray.cluster_utils import Cluster

    node_dir = tmp_path_factory.mktemp("nodes")
    # A short root: Ray's Unix socket paths under the temp dir must stay below 108 characters.
    root = Path(tempfile.mkdtemp(prefix="rpnf-", dir="/tmp"))
    from ray._common.utils import get_ray_address_file

    # Cluster() writes its address where a bare `ray.init()` on this machine looks for one: put back what was there.
    address_file = Path(get_ray_address_file(None))
    previous = address_file.read_text() if address_file.exists() else None
    fast_failure_detection = {"health_check_period_ms": 500, "health_check_failure_threshold": 4}
    nodes = dict(temp_dir=str(root), object_store_memory=100 * 2**20)
    c = None
    try:
        c = Cluster(
            initialize_head=True,
            head_node_args=dict(num_cpus=0, include_dashboard=False, _system_config=fast_failure_detection, **nodes),
        )
        for _ in range(2):
            c.add_node(num_cpus=2, **nodes)
        c.wait_for_nodes()
        if previous is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(previous)
        runtime_env = {
            "py_modules": [str(slow_model_package / "rp_slow_model")],
            "env_vars": {"RP_SLOW_S": "0.05", "RP_NODE_DIR": str(node_dir)},
        }
        ray.init(address=c.address, runtime_env=runtime_env, logging_level="ERROR")
        yield c, node_dir
    finally:
        ray.shutdown()
        if c is not None:
            c.shutdown()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def inputs(slow_model_package, tmp_path_factory):
    """40 data shards and the slow model's checkpoint, written in this process."""
    import sys

    sys.path.insert(0, str(slow_model_package))
    out = tmp_path_factory.mktemp("inputs")
    config = load_config(None, [f"data.max_train_samples={N_ROWS}", f"data.shard_rows={SHARD_ROWS}"])
    prepare.run(config.data, config.noise, str(out / "data"), log=lambda *_: None)
    model_cfg = ModelConfig(name="user", factory="rp_slow_model:make", probe_width=16)
    import torch

    torch.manual_seed(0)
    model = build_model(model_cfg, (1, 8, 8), 10)
    save_model(str(out / "model.pt"), model, model_signature(model_cfg, (1, 8, 8), 10))
    shards = prepare.train_shards(str(out / "data"))
    assert len(shards) == N_ROWS // SHARD_ROWS
    return shards, str(out / "model.pt")


def _read(uri: str) -> dict[str, np.ndarray]:
    import pyarrow as pa

    files = attribute.shards(uri)
    return columns_from_table(pa.concat_tables([storage.read_table(u) for u in files]))


def test_node_lost_during_attribution(cluster, inputs, tmp_path):
    from raypipe.distributed.ray_executor import RayExecutor

    c, node_dir = cluster
    shards, model_uri = inputs
    ray_out = tmp_path / "ray"
    executor = RayExecutor(load_config(None, ["run.executor=ray", "ray.max_actors=2"]), log=lambda *_: None)
    assert executor.plan.max_actors == 2 and executor.plan.cpus_per_actor == 1.0

    removed: dict[str, object] = {}

    def lose_a_node() -> None:
        """Once 4 shards are out, kill (no graceful shutdown) a worker node where the model was loaded."""
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            done = len(attribute.shards(str(ray_out))) if (ray_out / "samples").exists() else 0
            hosts = {p.read_text() for p in node_dir.glob("process-*")}
            victims = [n for n in c.worker_nodes if n.node_id in hosts]
            if done >= 4 and victims:
                removed["shards_done"] = done
                removed["node_id"] = victims[0].node_id
                removed["processes_before"] = {p.name for p in node_dir.glob("process-*")}
                c.remove_node(victims[0], allow_graceful=False)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=lose_a_node, daemon=True)
    killer.start()
    spec = attribute.AttributionPass(model_uri, RULE, BATCH)
    rows = executor.attribute(spec, attribute.pending_shards(shards, str(ray_out)))
    killer.join(timeout=60)

    # The node really went away in the middle of the job.
    assert "node_id" in removed, "no node was removed"
    assert removed["shards_done"] < len(shards), removed
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert removed["node_id"] not in alive
    started_after = [p.read_text() for p in node_dir.glob("process-*") if p.name not in removed["processes_before"]]
    assert started_after, "no worker process loaded the model after the loss"
    assert removed["node_id"] not in started_after  # ...on the node that survived

    # ...and the job completed: every sample once, the same values as without the failure.
    assert rows == N_ROWS
    assert attribute.pending_shards(shards, str(ray_out)) == []
    assert not list((ray_out / "samples").glob(".tmp-*"))
    remote = _read(str(ray_out))
    assert len(remote["sample_id"]) == len(np.unique(remote["sample_id"])) == N_ROWS

    local_out = str(tmp_path / "local")
    LocalExecutor(log=lambda *_: None).attribute(spec, attribute.pending_shards(shards, local_out))
    local = _read(local_out)
    order_l, order_r = np.argsort(local["sample_id"]), np.argsort(remote["sample_id"])
    assert np.array_equal(local["sample_id"][order_l], remote["sample_id"][order_r])
    for key in ("attribution", "probe", "loss", "pred_label", "label"):
        np.testing.assert_allclose(remote[key][order_r], local[key][order_l], rtol=1e-5, atol=1e-6, err_msg=key)
