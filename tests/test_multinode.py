"""The pipeline on a multi-node Ray cluster (one per module, all on this machine).

A head with one CPU and no label, two worker nodes that declare the custom resource
``raypipe_worker``; ``ray.worker_resource=raypipe_worker`` must put every attribution task,
per-shard task, training task and Ray Train worker on the worker nodes, and the run must come out complete.
Token authentication stays on, with a token file of this module's own (RAY_AUTH_TOKEN_PATH).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from raypipe import layout, storage
from raypipe.config import load_config
from raypipe.tables import columns_from_table

pytestmark = [pytest.mark.ray, pytest.mark.slow]

LABEL = "raypipe_worker"
AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
QUICK = [
    "data.max_train_samples=400",
    "data.shard_rows=100",  # 4 shards: several actor calls and per-shard tasks
    "initial.epochs=5",
    # The initial model is enough to see where a one-worker route's Ray task goes (a Ray Train route
    # is run on its own below). The fine-tuning routes on Ray: tests/test_jobs.py.
    "run.routes=[]",
    "run.executor=ray",
    f"ray.worker_resource={LABEL}",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    from ray._private import authentication_test_utils as auth
    from ray.cluster_utils import Cluster

    # A short root: Ray's Unix socket paths under the temp dir must stay below 108 characters.
    root = Path(tempfile.mkdtemp(prefix="rpmn-", dir="/tmp"))
    saved = {k: os.environ.get(k) for k in AUTH_ENV}
    # The documented way to keep several tokens apart: a token file per cluster, RAY_AUTH_TOKEN_PATH
    # (the processes of the cluster inherit it; ~/.ray/auth_token is never touched). Ray caches its
    # config and the token in this process: reset them (Ray's own test helper) now and at the end.
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ["RAY_AUTH_MODE"] = "token"
    token_file = root / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    auth.reset_auth_token_state()
    # dashboard_agent_listen_port=0: any free port (its default, 52365, is the same for every node).
    nodes = dict(temp_dir=str(root / "ray"), object_store_memory=150 * 2**20, dashboard_agent_listen_port=0)
    c = None
    try:
        # Every port random / free: other Ray clusters may run on this machine at the same time.
        c = Cluster(
            initialize_head=True,
            head_node_args=dict(
                num_cpus=1,
                include_dashboard=True,  # the state API (list_actors / list_tasks) goes through it
                dashboard_host="127.0.0.1",
                dashboard_port=_free_port(),
                **nodes,
            ),
        )
        for _ in range(2):
            c.add_node(num_cpus=1, resources={LABEL: 1}, **nodes)
        c.wait_for_nodes()
        ray.init(address=c.address, logging_level="ERROR")
        yield c
    finally:
        ray.shutdown()
        if c is not None:
            c.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        auth.reset_auth_token_state()
        shutil.rmtree(root, ignore_errors=True)
        time.sleep(2)  # the dashboard may still write a file while it dies
        shutil.rmtree(root, ignore_errors=True)


def _sample_ids(uri: str, skip: str = "") -> np.ndarray:
    import pyarrow as pa

    files = [u for u in storage.list_files(uri, ".parquet") if u != skip]
    assert files, uri
    return columns_from_table(pa.concat_tables([storage.read_table(u, ["sample_id"]) for u in files]))["sample_id"]


def test_cluster_requires_the_token(cluster):
    import urllib.error
    import urllib.request

    url = f"http://{cluster.webui_url}/api/jobs/"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url, timeout=30)
    assert e.value.code == 401
    token = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text()
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200


def test_plan_counts_only_labelled_nodes(cluster):
    from raypipe.distributed.ray_executor import placement_resources, schedulable_nodes, schedulable_resources
    from raypipe.distributed.resources import plan_resources

    assert ray.cluster_resources()["CPU"] == 3  # the head's CPU is in the cluster...
    nodes = schedulable_nodes(LABEL)
    assert sorted(n["CPU"] for n in nodes) == [1.0, 1.0]  # ...but not in what the work may use
    assert len(schedulable_nodes(None)) == 3
    plan = plan_resources(schedulable_resources(nodes), load_config(None, QUICK).ray, nodes)
    # Every actor / task / Train worker fits on one 1-CPU worker node.
    assert plan.cpus_per_actor <= 1 and plan.cpus_per_task <= 1
    assert plan.num_workers * plan.cpus_per_worker <= 2 and plan.cpus_per_worker <= 1
    assert placement_resources(LABEL) == {LABEL: 0.01} and placement_resources(None) == {}
    from raypipe.errors import RaypipeError

    with pytest.raises(RaypipeError, match="no alive node"):
        schedulable_nodes("no_such_label")


def test_pipeline_runs_on_the_labelled_worker_nodes(cluster, tmp_path):
    from ray.util.state import list_actors, list_tasks

    import raypipe
    from raypipe.distributed.ray_executor import RayExecutor
    from raypipe.layout import RunLayout
    from raypipe.pipeline import Run, train_request

    out = str(tmp_path / "run")
    report = raypipe.run(load_config("jobs/configs/digits.yaml", QUICK), out, log=lambda *_: None)

    # Complete: every stage finished, every training sample exactly once in attribution and partition.
    for stage in ("data", "initial", "attribution", "partition", "prune"):
        assert storage.read_manifest(storage.join(out, stage)) is not None, stage
    n_train = storage.read_manifest(storage.join(out, "data"))["summary"]["rows"]["train"]
    assert n_train == 400
    for folder in (
        layout.attribution_dir(storage.join(out, "attribution")),
        layout.partition_dir(storage.join(out, "partition")),
    ):
        ids = _sample_ids(folder)
        assert len(ids) == len(np.unique(ids)) == n_train, folder
    assert set(report["routes"]) == {"initial"}
    assert 0.0 < report["routes"]["initial"]["accuracy"] <= 1.0
    assert storage.read_json(storage.join(out, "report.json"))["routes"].keys() == report["routes"].keys()

    # A route on two Ray Train workers too (the run above trained its one-worker route in a Ray task).
    config = load_config("jobs/configs/digits.yaml", [*QUICK, "ray.num_workers=2", "retrain.epochs=1"])
    executor = RayExecutor(config, log=lambda *_: None)
    assert executor.plan.num_workers == 2
    run = Run(config, RunLayout(out), executor, log=lambda *_: None).run(["partition"])  # skipped: finished
    retrain = executor.train(train_request(run, "retrain", str(tmp_path / "retrain")))
    assert retrain["num_workers"] == 2 and retrain["epochs"] == 1

    # Placement, from Ray's state API: where the actors and tasks of this run ran.
    head = cluster.head_node.node_id
    workers = {n.node_id for n in cluster.worker_nodes}
    actors = list_actors(detail=True, limit=10_000, timeout=120, raise_on_missing_output=False)
    ours = [a for a in actors if a.class_name == "RayTrainWorker"]
    for a in ours:  # each asks for the label (in a placement group: LABEL_group_...), so it can only
        # be placed on a worker node...
        asked = {k: v for k, v in a.required_resources.items() if k == LABEL or k.startswith(f"{LABEL}_group_")}
        assert asked and all(v == pytest.approx(0.01) for v in asked.values()), (a.class_name, a.required_resources)
    # ...and those that were placed are there.
    placed = [a for a in ours if a.node_id is not None]
    assert placed, sorted({a.class_name for a in actors})
    for a in placed:
        assert a.node_id in workers and a.node_id != head, (a.class_name, a.node_id)
    tasks = list_tasks(detail=True, limit=10_000, timeout=120, raise_on_missing_output=False)
    by_name = {name: [t for t in tasks if t.name == name] for name in ("_route_task", "attribute_shard", "_call")}
    # The initial model trained in a Ray task; the attribution shards; the mixture's fit sample, scoring and
    # the sensitivity sums: each asked for the label, and ran on a worker node.
    for name, ran in by_name.items():
        assert ran, name
        assert all(t.required_resources.get(LABEL) == pytest.approx(0.01) for t in ran), (name, ran[0])
        assert {t.node_id for t in ran} <= workers, (name, {t.node_id for t in ran})
