"""`raypipe sweep`: the search space, resources and outputs without Ray; then sweeps on a local Ray
cluster (one per module): ASHA stops bad trials, the best is the best objective, attributions are
computed once, Ray Train inside Tune trials, and a sweep killed mid-way resumes without rerunning
its finished trials."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from raypipe import layout, storage
from raypipe import sweep as core
from raypipe.config import load_config
from raypipe.distributed.resources import plan_sweep
from raypipe.errors import ConfigError, DataError
from raypipe.layout import SweepLayout
from raypipe.sweep import load_sweep_config
from raypipe.sweep.space import check_resumable
from raypipe.sweep.trial import validation_set, write_validation_set

# Small budgets: 600 training samples, a 15-epoch initial model, fine-tuning of 2-3 epochs.
QUICK = ["data.max_train_samples=600", "initial.epochs=15", "run.executor=local"]
# 4 trials: 2 rules x 2 learning rates, the terrible lr (5.0) last. Two trials run at a time on 2
# CPUs, so the good ones have reported at ASHA's first rung before a terrible one reaches it: the
# terrible trials are always stopped there (at least one early stop, whatever the timings).
SWEEP_A = [
    "sweep.rules=[loss,grad_x_act_label]",
    "sweep.tau=[0.5]",
    "sweep.prune_fraction=[0.156]",
    "sweep.routes=[l_ft]",
    "sweep.lr=[0.001,5.0]",
    "sweep.epochs=[3]",
    "sweep.num_samples=0",
    "sweep.grace_period=1",
    "sweep.cpus_per_trial=1",
]


def _config(*extra: str):
    return load_sweep_config("jobs/configs/digits_sweep.yaml", [*QUICK, *SWEEP_A, *extra])


def _starts(trial_dir: Path) -> int:
    return sum(1 for line in (trial_dir / "events.jsonl").read_text().splitlines() if '"start"' in line)


# ---------------------------------------------------------------------------------------------
# Without Ray.


def test_search_space_grid_order_and_distinct_samples():
    cfg = load_sweep_config(None, ["sweep.lr=[0.001,0.01]", "sweep.tau=[0.3,0.5,0.7]", "sweep.num_samples=0"]).sweep
    specs = core.trial_specs(cfg)
    n = 2 * len(cfg.epochs) * len(cfg.routes) * len(cfg.rules) * 3 * len(cfg.prune_fraction)
    assert len(specs) == len(set(specs)) == n
    # lr varies slowest: the first half of the grid has the first learning rate.
    assert {s.lr for s in specs[: n // 2]} == {0.001} and {s.lr for s in specs[n // 2 :]} == {0.01}
    sampled = core.trial_specs(load_sweep_config(None, ["sweep.num_samples=5", "sweep.seed=3"]).sweep)
    assert len(sampled) == len(set(sampled)) == 5  # distinct combinations
    assert sampled == core.trial_specs(load_sweep_config(None, ["sweep.num_samples=5", "sweep.seed=3"]).sweep)
    assert len(core.trial_specs(load_sweep_config(None, ["sweep.num_samples=100000"]).sweep)) == len(
        core.trial_specs(load_sweep_config(None, ["sweep.num_samples=0"]).sweep)
    )


def test_trial_config_sets_each_hyperparameter():
    config = load_config(None, [])
    spec = core.TrialSpec(lr=0.02, epochs=7, route="f_ft", rule="grad_x_act_label", tau=0.3, prune_fraction=0.2)
    t = core.trial_config(config, spec)
    assert (t.f_ft.lr, t.f_ft.epochs, t.run.routes) == (0.02, 7, ["f_ft"])
    assert (t.attribution.rule, t.partition.tau, t.prune.fraction) == ("grad_x_act_label", 0.3, 0.2)
    assert t.l_ft == config.l_ft and t.data == config.data


@pytest.mark.parametrize(
    "override,key",
    [
        ("sweep.tau=[0.5,1.5]", "'sweep.tau'"),
        ("sweep.rules=[loss,nope]", "'sweep.rules'"),
        ("sweep.routes=[retrain]", "'sweep.routes'"),
        ("sweep.lr=[]", "'sweep.lr'"),
        ("sweep.objective=trusted", "'sweep.trusted_path'"),
        ("sweep.grace_period=50", "'sweep.grace_period'"),
        ("sweep.cpus_per_trial=0", "'sweep.cpus_per_trial'"),
        ("sweep.reduction_factor=1", "'sweep.reduction_factor'"),
        ("sweep.objective=clean", "'sweep.objective'"),
    ],
)
def test_sweep_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_sweep_config(None, [override])


def test_plan_fits_the_cluster():
    cfg = load_sweep_config(None, ["sweep.cpus_per_trial=1"]).sweep
    plan = plan_sweep({"CPU": 2.0}, cfg, 16)
    assert plan.trial_resources == {"cpu": 1.0} and plan.max_concurrent == 2 and plan.workers == 1
    half = plan_sweep({"CPU": 2.0}, load_sweep_config(None, ["sweep.cpus_per_trial=0.5"]).sweep, 16)
    assert half.max_concurrent == 4
    assert plan_sweep({"CPU": 2.0}, cfg, 1).max_concurrent == 1  # never more than the trials
    capped = load_sweep_config(None, ["sweep.max_concurrent_trials=1"]).sweep
    assert plan_sweep({"CPU": 8.0}, capped, 16).max_concurrent == 1
    # Ray Train inside the trial: the driver's share plus its workers' stay within the trial's CPUs,
    # so concurrent trials together never ask for more than the cluster has (no hang on 2 CPUs).
    w = plan_sweep({"CPU": 2.0}, load_sweep_config(None, ["sweep.workers_per_trial=2"]).sweep, 16)
    assert w.workers == 2 and w.trial_resources["cpu"] + 2 * w.cpus_per_worker <= 1.0 + 1e-9
    assert w.max_concurrent * (w.trial_resources["cpu"] + 2 * w.cpus_per_worker) <= 2.0 + 1e-9
    with pytest.raises(ConfigError, match="'sweep.cpus_per_trial'"):
        plan_sweep({"CPU": 2.0}, load_sweep_config(None, ["sweep.cpus_per_trial=4"]).sweep, 4)
    with pytest.raises(ConfigError, match="'sweep.gpus_per_trial'"):
        plan_sweep({"CPU": 2.0}, load_sweep_config(None, ["sweep.gpus_per_trial=1"]).sweep, 4)


def test_choose_best_is_the_highest_objective_first_on_ties():
    def row(i, acc, status="completed"):
        return {"trial_id": f"t{i}", core.METRIC: acc, "status": status}

    rows = [row(0, 0.5), row(1, float("nan"), "infeasible"), row(2, 0.7), row(3, 0.7), row(4, 0.9, "error")]
    assert core.choose_best(rows)["trial_id"] == "t2"
    assert core.choose_best([row(0, float("nan"), "infeasible")]) is None


def test_resuming_with_other_settings_is_refused(tmp_path):
    out = str(tmp_path / "sweep")
    check_resumable(load_sweep_config(None, []), out)
    check_resumable(load_sweep_config(None, ["sweep.cpus_per_trial=0.5", "ray.max_failures=0"]), out)  # where, not what
    with pytest.raises(ConfigError, match="'sweep.tau'"):
        check_resumable(load_sweep_config(None, ["sweep.tau=[0.5]"]), out)


def _validation(overrides: list[str], out: str):
    """The sweep's validation set as trials read it (checked and written once, before any trial)."""
    config = load_sweep_config(None, overrides)
    write_validation_set(config, out)
    return validation_set(config, out)


def test_trusted_validation_set_formats(tmp_path):
    import pyarrow as pa

    from raypipe.data import table_from_samples
    from raypipe.stages import data as prepare

    out = str(tmp_path / "sweep")
    config = load_config(None, QUICK)
    data_uri = SweepLayout(out).base.stage("data")
    prepare.run(config.data, config.noise, data_uri, log=lambda *_: None)
    val = prepare.read_split(data_uri, "val")
    summary = {"sample_shape": list(val.sample_shape), "num_classes": val.num_classes}
    storage.write_manifest(data_uri, {"fingerprint": "0", "summary": summary})  # what the data stage's manifest holds
    # raypipe's own table format, with the clean labels
    own = tmp_path / "trusted.parquet"
    storage.write_table(str(own), table_from_samples(val))
    got = _validation(["sweep.objective=trusted", f"sweep.trusted_path={own}"], out)
    assert got.x.shape == (len(val), *val.sample_shape) and np.array_equal(got.label, val.label)
    # the parquet source's format: a flat image column and a label column
    flat = tmp_path / "flat.parquet"
    rows = val.x.reshape(len(val), -1)
    storage.write_table(str(flat), pa.table({"image": list(rows), "label": val.true_label}))
    got = _validation(["sweep.objective=trusted", f"sweep.trusted_path={flat}"], out)
    assert got.x.shape == (len(val), *val.sample_shape) and np.array_equal(got.label, val.true_label)
    np.testing.assert_allclose(got.x, val.x)
    # wrong sample width, missing file: errors naming the key
    storage.write_table(str(flat), pa.table({"image": list(rows[:, :10]), "label": val.true_label}))
    with pytest.raises(DataError, match="'sweep.trusted_path'"):
        _validation(["sweep.objective=trusted", f"sweep.trusted_path={flat}"], out)
    with pytest.raises(ConfigError, match="'sweep.trusted_path'"):
        _validation(["sweep.objective=trusted", "sweep.trusted_path=/nowhere.pq"], out)


# ---------------------------------------------------------------------------------------------
# On a local Ray cluster.

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def sweep_a(ray_cluster, tmp_path_factory):
    from raypipe.api import run_sweep

    out = tmp_path_factory.mktemp("sweep") / "a"
    # A relative --out, as users type it (trials run in other working directories).
    result = run_sweep(_config(), os.path.relpath(out), log=lambda *_: None)
    return out, result


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_completes_stops_bad_trials_and_picks_the_best(sweep_a):
    out, result = sweep_a
    rows = core.read_table(str(out))
    assert len(rows) == 4 and len(core.read_table(str(out))) == len(result["rows"])
    assert all(r["status"] in ("completed", "stopped_early") for r in rows), rows
    # ASHA cut at least one trial (the terrible learning rate) before its last epoch.
    stopped = [r for r in rows if r["status"] == "stopped_early"]
    assert stopped and all(r["epochs_run"] < r["epochs"] for r in stopped)
    assert all(r["epochs_run"] < 3 for r in rows if r["lr"] == 5.0)
    # The chosen best is the trial with the best objective in the table.
    best = max(rows, key=lambda r: r[core.METRIC])
    report = json.loads((out / "best" / "report.json").read_text())
    assert report["trial_id"] == best["trial_id"] and report["objective"]["value"] == best[core.METRIC]
    assert report["objective"]["mode"] == "noisy" and 0.0 <= report["test"]["accuracy"] <= 1.0
    assert best["lr"] == 0.001
    # best/: a runnable config of that trial and its repaired model (the weights its objective was measured on)
    best_cfg = load_config(str(out / "best" / "config.yaml"))
    assert (best_cfg.l_ft.lr, best_cfg.attribution.rule, best_cfg.run.routes) == (0.001, best["rule"], ["l_ft"])
    from raypipe.stages.data import read_split
    from raypipe.training.checkpoint import load_model
    from raypipe.training.loop import evaluate, resolve_device

    model, _, extra = load_model(str(out / "best" / "model.pt"))
    val = read_split(str(out / "base" / "data"), "val")
    assert evaluate(model, val.x, val.label, resolve_device("cpu"))["accuracy"] == pytest.approx(best[core.METRIC])
    assert extra["sweep_trial"] == best["trial_id"]
    assert (out / "trials.parquet").is_file() and (out / "plots" / "objective.png").stat().st_size > 10_000


@pytest.mark.ray
@pytest.mark.slow
def test_attributions_computed_once_per_rule_and_rerun_redoes_nothing(sweep_a):
    from raypipe.api import run_sweep

    out, result = sweep_a
    rules = ["loss", "grad_x_act_label"]
    assert sorted(result["base_ran"]) == sorted(
        ["base/data", "base/initial", *[f"base/{rule}/attribution" for rule in rules]]
    )
    manifests = {rule: storage.read_manifest(str(out / "base" / rule / "attribution")) for rule in rules}
    trial_dirs = sorted((out / "trials").iterdir())
    assert len(trial_dirs) == 4
    for trial in trial_dirs:
        assert not (trial / "attribution").exists()  # trials read the shared Parquet, never recompute it
        rule = json.loads((trial / "spec.json").read_text())["rule"]
        part = storage.read_manifest(str(trial / "partition"))
        assert part["inputs"]["attribution"] == manifests[rule]["fingerprint"]
    starts = {t.name: _starts(t) for t in trial_dirs}

    # A rerun of the finished sweep: no stage, no trial runs again.
    again = run_sweep(_config(), str(out), log=lambda *_: None)
    assert again["base_ran"] == []
    for rule in rules:
        assert (
            storage.read_manifest(str(out / "base" / rule / "attribution"))["finished_at"]
            == (manifests[rule]["finished_at"])
        )
    assert {t.name: _starts(t) for t in trial_dirs} == starts
    assert again["best"]["trial_id"] == result["best"]["trial_id"]


def _terminated(tune_dir: Path) -> set[str] | None:
    """Trial ids Tune's saved experiment state holds as TERMINATED (what Tuner.restore will keep)."""
    files = sorted(glob.glob(str(tune_dir / "experiment_state-*.json")))
    if not files:
        return None
    try:
        state = json.loads(Path(files[-1]).read_text())
    except (json.JSONDecodeError, OSError):  # caught while being rewritten
        return None
    trials = [json.loads(t[0]) for t in state["trial_data"]]
    return {t["trial_id"] for t in trials if t["status"] == "TERMINATED"}


@pytest.mark.ray
@pytest.mark.slow
def test_killed_sweep_resumes_without_rerunning_finished_trials(sweep_a, ray_cluster, tmp_path):
    from raypipe.api import run_sweep

    out_a, _ = sweep_a
    out = tmp_path / "b"
    shutil.copytree(out_a / "base", out / "base")  # same data and initial settings: those stages are skipped
    sweep_b = ["sweep.rules=[loss]", "sweep.tau=[0.4,0.6]", "sweep.prune_fraction=[0.0,0.156]", "sweep.lr=[0.001]"]
    argv = ["sweep", "--out", str(out), "--config", "jobs/configs/digits_sweep.yaml", *QUICK, *SWEEP_A, *sweep_b]
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}  # save Tune's experiment state every second
    code = f"import sys; from raypipe.cli import main; sys.exit(main({[*argv, f'ray.address={ray_cluster}']!r}))"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, env=env)
    done: set[str] = set()
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            done = _terminated(out / "tune") or set()
            if done:
                break
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)  # a crash, not a clean shutdown
        proc.wait()
    assert done, (tmp_path / "first.log").read_text()[-3000:]
    assert len(done) < 4, "the sweep finished before it could be interrupted"

    result = run_sweep(_config(*sweep_b), str(out), log=lambda *_: None)
    rows = result["rows"]
    assert len(rows) == 4 and all(r["status"] in ("completed", "stopped_early") for r in rows), rows
    assert done <= {r["trial_id"] for r in rows}
    for trial_id in done:  # finished before the kill: never started again
        assert _starts(out / "trials" / trial_id) == 1
    assert (
        json.loads((out / "best" / "report.json").read_text())["trial_id"]
        == max(rows, key=lambda r: r[core.METRIC])["trial_id"]
    )


@pytest.mark.ray
@pytest.mark.slow
def test_ray_train_inside_tune_trials_with_a_trusted_objective(sweep_a, tmp_path):
    """workers_per_trial=2: each trial's fine-tuning is a TorchTrainer started inside the Tune
    function; its per-epoch reports reach Tune (ASHA's input) through the relay of raypipe.distributed.tune."""
    from raypipe.api import run_sweep
    from raypipe.data import table_from_samples
    from raypipe.stages.data import read_split

    out_a, _ = sweep_a
    out = tmp_path / "c"
    shutil.copytree(out_a / "base", out / "base")
    val = read_split(str(out / "base" / "data"), "val")
    trusted = tmp_path / "trusted.parquet"  # a small clean labelled set (here: the val inputs, true labels)
    storage.write_table(str(trusted), table_from_samples(dataclasses.replace(val, label=val.true_label)))
    config = _config(
        "sweep.rules=[loss]",
        "sweep.routes=[f_ft]",
        "sweep.lr=[0.001]",
        "sweep.epochs=[2]",
        "sweep.grace_period=2",
        "sweep.workers_per_trial=2",
        "sweep.objective=trusted",
        f"sweep.trusted_path={trusted}",
    )
    result = run_sweep(config, str(out), log=lambda *_: None)
    rows = result["rows"]
    assert len(rows) == 1 and all(r["status"] == "completed" and r["epochs_run"] == 2 for r in rows), [
        (r["status"], r["epochs_run"], r["message"]) for r in rows
    ]
    for row in rows:
        assert Path(layout.ray_train_dir(str(out / "trials" / row["trial_id"] / "f_ft"))).is_dir()
        reported = [
            json.loads(line)
            for path in glob.glob(str(out / "tune" / f"*{row['trial_id']}*" / "result.json"))
            for line in Path(path).read_text().splitlines()
        ]
        assert [r["epoch"] for r in reported] == [1, 2]
        assert reported[-1][core.METRIC] == pytest.approx(row[core.METRIC])
    report = json.loads((out / "best" / "report.json").read_text())
    assert report["objective"]["mode"] == "trusted" and report["objective"]["n_val"] == len(val)


@pytest.mark.ray
def test_crashing_trials_are_retried_or_recorded_and_the_sweep_still_picks_a_best(ray_cluster, faults, tmp_path):
    """One trial crashes once (Tune retries it: ray.max_failures=2) and completes; another crashes every
    time (1 try + 2 retries) and is recorded as `error` in the trials table; the sweep still writes its
    best from the trials that finished. The crashes come from the fault hook of tests/faults."""
    from raypipe.api import run_sweep

    markers = tmp_path / "markers"
    markers.mkdir()
    crashes = {"loss:0.001": 1, "grad_x_act_label:0.001": 99}
    (faults / "crash.json").write_text(json.dumps({"dir": str(markers), "crashes": crashes}))
    out = tmp_path / "crash"
    config = _config("sweep.lr=[0.001]", "sweep.epochs=[2]", "sweep.grace_period=2", "ray.max_failures=2")
    try:
        result = run_sweep(config, str(out), log=lambda *_: None)
    finally:
        (faults / "crash.json").unlink()
    rows = {r["rule"]: r for r in result["rows"]}
    assert len(list(markers.glob("crash-loss-*"))) == 1
    assert len(list(markers.glob("crash-grad_x_act_label-*"))) == 3  # the first try and both retries
    retried, failed = rows["loss"], rows["grad_x_act_label"]
    assert retried["status"] == "completed" and retried["epochs_run"] == 2, retried
    assert failed["status"] == "error" and "injected crash" in failed["message"], failed
    report = json.loads((out / "best" / "report.json").read_text())
    assert report["trial_id"] == retried["trial_id"]
    assert (out / "best" / "model.pt").is_file()
