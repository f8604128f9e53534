"""The pipeline on a local Ray cluster (one per module): attribution in Ray tasks and on an actor pool
(the GPU path, run on CPUs here), per-shard sums, training routes in a Ray task and on Ray Train with
the in-process numbers, skip and --from on rerun."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

import raypipe
from raypipe import layout, storage
from raypipe.config import load_config
from raypipe.core.sensitivity import SufficientStats
from raypipe.executors import LocalExecutor
from raypipe.layout import RunLayout
from raypipe.pipeline import Run, train_request
from raypipe.stages import attribution as attribute
from raypipe.stages import data as prepare
from raypipe.stages import prune
from raypipe.stages.partition import read_partition
from raypipe.tables import columns_from_table
from raypipe.training.checkpoint import load_model

pytestmark = [pytest.mark.ray]

QUICK = ["data.shard_rows=300", "initial.epochs=60", "f_ft.epochs=10", "run.routes=[f_ft]"]


@pytest.fixture(scope="module")
def ray_executor(ray_cluster):
    from raypipe.distributed.ray_executor import RayExecutor

    return RayExecutor(load_config(None, ["run.executor=ray"]), log=lambda *_: None)


def _read_attribution(uri: str, folder=layout.attribution_dir) -> dict[str, np.ndarray]:
    """Every shard of one folder of an attribution stage (its per-sample shards, or its kept features)."""
    import pyarrow as pa

    tables = [storage.read_table(u) for u in storage.list_files(folder(uri), ".parquet")]
    return columns_from_table(pa.concat_tables(tables))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """Data + a quickly trained initial model, in-process (the reference for the Ray stages)."""
    out = str(tmp_path_factory.mktemp("base"))
    config = load_config(None, ["data.shard_rows=300", "initial.epochs=5", "detection.early_epoch=2", "run.routes=[]"])
    Run(config, RunLayout(out), LocalExecutor(log=lambda *_: None), log=lambda *_: None).run(["data", "initial"])
    return out


@pytest.mark.parametrize("rule", ["grad_x_act_maxclass", "last_layer_grad"])
def test_ray_attribution_equals_in_process(base_run, ray_executor, tmp_path, rule):
    shards = prepare.train_shards(RunLayout(base_run).stage("data"))
    assert len(shards) >= 3  # several shards, so several tasks
    initial = RunLayout(base_run)
    early = (("early", layout.early_model_file(initial.stage("initial"))),)  # the epoch-2 model
    spec = attribute.AttributionPass(initial.model("initial"), rule, 64, probe_models=early)
    local_out, ray_out = str(tmp_path / "local"), str(tmp_path / "ray")
    LocalExecutor(log=lambda *_: None).attribute(spec, attribute.pending_shards(shards, local_out))
    rows = ray_executor.attribute(spec, attribute.pending_shards(shards, ray_out))

    local, remote = _read_attribution(local_out), _read_attribution(ray_out)
    n_train = storage.read_manifest(RunLayout(base_run).stage("data"))["summary"]["rows"]["train"]
    assert rows == n_train
    # Every sample exactly once, and the same values as in-process for every sample_id.
    assert len(np.unique(remote["sample_id"])) == len(remote["sample_id"]) == n_train
    order_l, order_r = np.argsort(local["sample_id"]), np.argsort(remote["sample_id"])
    assert np.array_equal(local["sample_id"][order_l], remote["sample_id"][order_r])
    for key in ("attribution", "probe", "probe_early", "loss", "pred_label"):
        np.testing.assert_allclose(remote[key][order_r], local[key][order_l], rtol=1e-5, atol=1e-6)
    # The second model's probe space is its own: the early model's activations, computed in the same pass.
    train = prepare.read_split(RunLayout(base_run).stage("data"), "train")
    model, _, _ = load_model(dict(early)["early"])
    want = attribute.probe_activations(model.eval(), train.x, "cpu")
    order = np.argsort(train.sample_id)
    pos = order[np.searchsorted(train.sample_id, remote["sample_id"], sorter=order)]
    np.testing.assert_allclose(remote["probe_early"], want[pos], rtol=1e-5, atol=1e-5)
    assert not np.allclose(remote["probe_early"], remote["probe"], atol=1e-3)
    # A rerun finds nothing pending: finished shards are never recomputed.
    assert attribute.pending_shards(shards, ray_out) == []


def test_attribution_on_an_actor_pool_equals_in_process(base_run, ray_cluster, tmp_path):
    """The GPU path (an actor per GPU, one model each), here on CPU actors: the same rows and kept features."""
    from raypipe.distributed.shards import attribute_on_actors

    shards = prepare.train_shards(RunLayout(base_run).stage("data"))
    spec = attribute.AttributionPass(RunLayout(base_run).model("initial"), "grad_x_act_label", 64, keep_features=True)
    local_out, ray_out = str(tmp_path / "local"), str(tmp_path / "ray")
    LocalExecutor(log=lambda *_: None).attribute(spec, attribute.pending_shards(shards, local_out))
    rows = attribute_on_actors(spec, attribute.pending_shards(shards, ray_out), 2, 1.0, 0.0, {})
    assert rows == sum(len(columns_from_table(storage.read_table(u, ["sample_id"]))["sample_id"]) for u in shards)
    local, remote = _read_attribution(local_out), _read_attribution(ray_out)
    assert np.array_equal(local["sample_id"], remote["sample_id"])  # shard by shard, in shard order
    for key in ("attribution", "probe", "loss"):
        np.testing.assert_allclose(remote[key], local[key], rtol=1e-5, atol=1e-6)
    kept_local, kept_ray = (
        _read_attribution(local_out, layout.features_dir),
        _read_attribution(ray_out, layout.features_dir),
    )
    np.testing.assert_allclose(kept_ray["features"], kept_local["features"], rtol=1e-5, atol=1e-6)


def test_ray_block_sums_equal_single_block(base_run, ray_executor, tmp_path):
    """The sensitivity statistics merged from per-shard Ray tasks equal one pass over all rows."""
    shards = prepare.train_shards(RunLayout(base_run).stage("data"))
    spec = attribute.AttributionPass(RunLayout(base_run).model("initial"), "loss", 64)
    attr_out = str(tmp_path / "attr")
    LocalExecutor(log=lambda *_: None).attribute(spec, attribute.pending_shards(shards, attr_out))
    # A fake partition aligned with the attribution shards, in the folder the partition stage writes them to.
    part_out = str(tmp_path / "part")
    part_dir = layout.partition_dir(part_out)
    rng = np.random.default_rng(0)
    from raypipe.tables import table_from_columns

    for uri in attribute.shards(attr_out):
        ids = columns_from_table(storage.read_table(uri, ["sample_id"]))["sample_id"]
        p_noisy = rng.random(len(ids)).astype(np.float32)
        cols = {"sample_id": ids, "p_noisy": p_noisy, "is_clean": p_noisy < 0.5}
        storage.write_table(storage.join(part_dir, uri.rsplit("/", 1)[-1]), table_from_columns(cols))
    jobs = [(u, storage.join(part_dir, u.rsplit("/", 1)[-1])) for u in attribute.shards(attr_out)]
    parts = ray_executor.map(lambda job: prune.shard_stats(job[0], job[1], "p_noisy", "pre_relu"), jobs, "stats")
    assert len(parts) == len(jobs) >= 3
    merged = SufficientStats(256)
    for part in parts:
        merged.merge(SufficientStats.from_dict(part))
    everything = _read_attribution(attr_out)
    part_all = columns_from_table(read_partition(part_out, ["sample_id", "p_noisy", "is_clean"]))
    order_a, order_p = np.argsort(everything["sample_id"]), np.argsort(part_all["sample_id"])
    single = SufficientStats(256).update(everything["probe"][order_a], part_all["p_noisy"][order_p])
    beta_m, icpt_m = merged.solve()
    beta_s, icpt_s = single.solve()
    assert merged.n == single.n
    np.testing.assert_allclose(beta_m, beta_s, rtol=1e-6, atol=1e-8)
    assert icpt_m == pytest.approx(icpt_s, rel=1e-6, abs=1e-9)


@pytest.mark.slow
def test_pipeline_on_ray_repairs_then_skips_then_reruns_from(ray_cluster, tmp_path):
    out = str(tmp_path / "run")
    run = RunLayout(out)
    config = load_config("jobs/configs/digits.yaml", [*QUICK, "run.executor=ray"])
    logs: list[str] = []
    report = raypipe.run(config, out, log=logs.append)
    acc = {route: m["accuracy"] for route, m in report["routes"].items()}
    assert set(acc) == {"initial", "f_ft"}
    # The repair works on Ray: F-FT beats the model trained on 40% wrong labels by a clear margin.
    assert acc["f_ft"] >= acc["initial"] + 0.03, acc
    assert report["detection"]["auroc"] > 0.8
    assert report["routes"]["f_ft"]["num_workers"] >= 1
    for stage in ("data", "initial", "attribution", "partition", "prune", "f_ft"):
        assert storage.read_manifest(run.stage(stage)) is not None

    # A second run skips every stage and reports the same numbers.
    logs.clear()
    again = raypipe.run(config, out, log=logs.append)
    skipped = {line.split("]")[0].lstrip("[") for line in logs if "up to date, skipped" in line}
    assert skipped == {"data", "initial", "attribution", "partition", "prune", "f_ft"}
    assert not any(line.endswith(" s") and "done in" in line for line in logs)
    assert again["routes"]["f_ft"]["accuracy"] == report["routes"]["f_ft"]["accuracy"]

    # --from partition reruns partition and what follows it, nothing before.
    before = {s: storage.read_manifest(run.stage(s))["finished_at"] for s in ("data", "initial", "attribution")}
    logs.clear()
    raypipe.run(config, out, from_stage="partition", log=logs.append)
    done = {line.split("]")[0].lstrip("[") for line in logs if "] done in" in line}
    assert done == {"partition", "prune", "f_ft"}
    after = {s: storage.read_manifest(run.stage(s))["finished_at"] for s in before}
    assert after == before


@pytest.mark.slow
def test_same_settings_same_accuracy_in_process_and_on_ray(base_run, ray_cluster, tmp_path):
    """F-FT from one pruned model: in-process, in a Ray task (one worker) and on 2 Ray Train workers (DDP,
    batch 64 = 2 x 32). One worker is the very same computation; two agree within the spread that the
    data-order seed alone gives in-process."""
    from raypipe.distributed.ray_executor import RayExecutor

    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    config = load_config(None, ["data.shard_rows=300", "initial.epochs=5", "f_ft.epochs=4", "run.routes=[f_ft]"])
    lay = RunLayout(str(out))
    run = Run(config, lay, LocalExecutor(log=lambda *_: None), log=lambda *_: None).run(
        ["attribution", "partition", "prune"]
    )
    request = train_request(run, "f_ft", "")

    def f_ft(executor, name: str, seed: int = 0) -> dict:
        return executor.train(dataclasses.replace(request, out_uri=str(tmp_path / name), seed=seed))

    local = {seed: f_ft(LocalExecutor(log=lambda *_: None), f"local{seed}", seed) for seed in (0, 1, 2)}
    task = f_ft(RayExecutor(load_config(None, ["ray.num_workers=1"]), log=lambda *_: None), "task")
    ddp = f_ft(RayExecutor(load_config(None, ["ray.num_workers=2"]), log=lambda *_: None), "ddp")
    assert task["num_workers"] == 1 and ddp["num_workers"] == 2
    assert task["accuracy"] == local[0]["accuracy"] and task["n_train"] == local[0]["n_train"]
    assert [h["train_loss"] for h in task["history"]] == pytest.approx([h["train_loss"] for h in local[0]["history"]])
    spread = max(r["accuracy"] for r in local.values()) - min(r["accuracy"] for r in local.values())
    assert abs(ddp["accuracy"] - local[0]["accuracy"]) <= max(spread, 0.01), (ddp["accuracy"], local, spread)


def test_relabel_on_ray_train_and_a_time_budget_that_stops_every_rank(base_run, ray_cluster, tmp_path):
    """The relabel route on 2 Ray Train workers trains on the samples it trains on in one process (the clean part
    plus the relabelled); with a time budget every rank stops after the same (first) epoch and the model is out."""
    from raypipe.distributed.ray_executor import RayExecutor
    from raypipe.stages.train import relabelled_rows

    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    over = ["data.shard_rows=300", "initial.epochs=5", "detection.early_epoch=2", "relabel.epochs=3"]
    config = load_config(None, [*over, "run.routes=[relabel]"])
    quiet = {"log": lambda *_: None}
    run = Run(config, RunLayout(str(out)), LocalExecutor(**quiet), **quiet).run(["attribution", "partition", "prune"])
    request = train_request(run, "relabel", "")
    local = LocalExecutor(**quiet).train(dataclasses.replace(request, out_uri=str(tmp_path / "local")))
    budget = dataclasses.replace(request.train, time_budget_s=1e-3)
    ddp = RayExecutor(load_config(None, ["ray.num_workers=2"]), **quiet).train(
        dataclasses.replace(request, out_uri=str(tmp_path / "ddp"), train=budget)
    )
    n_relabelled = len(relabelled_rows(run.layout.stage("partition"))[0])
    assert n_relabelled > 0 and local["n_train"] == run.summary("partition")["n_clean"] + n_relabelled
    assert ddp["num_workers"] == 2 and ddp["n_train"] == local["n_train"]
    assert local["epochs"] == 3 and ddp["epochs"] == 1 and len(ddp["history"]) == 1
    assert storage.exists(str(tmp_path / "ddp" / "model.pt"))
