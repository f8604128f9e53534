"""Every benchmark's --quick form, run as a user runs it (``python bench/<name>.py --quick``) with its
results and runs in a temporary folder: the result files are written there, hold the expected
sections and finite numbers where numbers belong, and the committed results in bench/results are
left alone. (Without Fashion-MNIST installed the scripts run on digits; the files say which.)"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raypipe.config import REPAIR_ROUTES

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
pytestmark = pytest.mark.slow


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.rglob("*")) if p.is_file()}


def run_quick(name: str, tmp_path: Path, runs: bool = True) -> tuple[dict, str]:
    """``bench/<name>.py --quick`` into tmp_path -> (its json, its markdown)."""
    results = tmp_path / "results"
    cmd = [sys.executable, str(BENCH / f"{name}.py"), "--quick", "--results", str(results)]
    if runs:
        cmd += ["--runs", str(tmp_path / "runs")]
    # The raypipe of this checkout, whatever the interpreter has installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    committed = _snapshot(BENCH / "results")
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{name} --quick failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    assert _snapshot(BENCH / "results") == committed, "a --results run changed bench/results"
    assert sorted(f.name for f in results.iterdir()) == [f"{name}_quick.json", f"{name}_quick.md"]
    data = json.loads((results / f"{name}_quick.json").read_text())
    md = (results / f"{name}_quick.md").read_text()
    meta = data["meta"]
    assert meta["dataset"] in ("fashion-mnist", "digits", "synthetic-cifar", "random")
    assert "--quick" in meta["command"] and meta["wall_seconds"] > 0
    assert md.startswith("# ") and "\nData: " in md and "## Against the goal" in md
    return data, md


def finite(value, low: float = -math.inf, high: float = math.inf) -> bool:
    """A real number (not a bool, not NaN or inf) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) and low <= value <= high


def accuracy(value) -> bool:
    return finite(value, 0.0, 1.0)


def test_paper_table1_quick(tmp_path):
    data, md = run_quick("paper_table1", tmp_path)
    assert set(data) == {"meta", "per_seed", "paper", "goals", "timings"}
    (seed,) = data["per_seed"]
    assert set(seed["routes"]) == {"initial", "l_ft", "f_ft", "retrain", "oracle"}
    for route in seed["routes"].values():
        assert accuracy(route["accuracy"]) and accuracy(route["macro_f1"]) and finite(route["seconds_total"], 0)
    assert all(accuracy(seed["detection"][k]) for k in ("precision", "recall", "f1", "auroc"))
    assert seed["partition"]["n_clean"] + seed["partition"]["n_noisy"] == 1000
    # Every stage ran in this fresh run, each with its CPU seconds.
    assert set(seed["stages_cpu_seconds"]) == set(seed["stages_seconds"])
    assert all(finite(v, 0) for v in seed["stages_cpu_seconds"].values())
    for key in ("f_ft_over_retrain_accuracy", "repair_over_retrain_f_ft", "repair_over_retrain_f_ft_cpu"):
        assert finite(data["goals"][key], 0), key
    assert isinstance(data["goals"]["goal_accuracy_met"], bool)
    assert "| accuracy |" in md


def test_label_noise_quick(tmp_path):
    data, md = run_quick("label_noise", tmp_path)
    assert set(data) == {"meta", "results"}
    res = data["results"]["sym40"]
    assert accuracy(res["initial"]["accuracy"]) and accuracy(res["oracle"]["accuracy"])
    assert res["n_train"] == 1000 and 0 < res["n_corrupted"] < 1000
    # The Oracle trained on the truly clean samples only.
    assert res["oracle"]["n_train"] == res["n_train"] - res["n_corrupted"]
    assert set(res["rows"]) == {"auto", "knn", "attr:loss"}
    for name, row in res["rows"].items():
        assert all(accuracy(row[k]) for k in ("precision", "recall", "f1", "auroc", "l_ft", "f_ft")), name
        assert finite(row["gap_f_ft"]) and finite(row["repair_seconds_f_ft"], 0), name
    assert res["rows"]["auto"]["stages_skipped"] == []
    assert "data" in res["rows"]["knn"]["stages_skipped"]  # the variant reused the base run's data stage
    assert all(finite(v, 0) for v in res["rows"]["auto"]["stages_cpu_seconds"].values())
    curve = res["f_ft_curve"]
    assert set(curve) == {"pruned", "unpruned"}
    for by_epochs in curve.values():
        assert set(by_epochs) == {"1", "2"} and all(len(a) == 2 and all(map(accuracy, a)) for a in by_epochs.values())
    assert "## sym40" in md


def test_detection_vs_cleanlab_quick(tmp_path):
    pytest.importorskip("cleanlab")
    data, md = run_quick("detection_vs_cleanlab", tmp_path)
    assert set(data) == {"meta", "results"}
    res = data["results"]["sym40"]
    assert set(res["raypipe"]) == {"auto", "knn"}
    for method in [*res["raypipe"].values(), res["cleanlab"]]:
        assert all(accuracy(method[k]) for k in ("precision", "recall", "f1", "auroc"))
        assert finite(method["seconds_total"], 0)
    assert len(res["cleanlab"]["seconds_folds"]) == 3
    assert "cleanlab 3-fold" in md


def test_class_noise_quick(tmp_path):
    pytest.importorskip("cleanlab")
    data, md = run_quick("class_noise", tmp_path)
    assert set(data) == {"meta", "results"}
    (seed,) = data["results"]["pairs40"].values()
    for row in (seed["auto"], seed["given"], seed["cleanlab"], *seed["signals"].values()):
        assert all(accuracy(row[k]) for k in ("precision", "recall", "f1", "auroc")), row
    # The Initial trained here has every signal; the same model given as a checkpoint has no trajectory and no
    # early checkpoint, and says so.
    assert {"knn", "knn_early", "fine", "aum", "early_loss", "wrong_events"} <= set(seed["signals"])
    assert seed["auto"]["signals_used"]["missing"] == {}
    assert set(seed["given"]["signals_used"]["missing"]) == {"trajectory", "knn_early"}
    assert seed["auto"]["transition_space"] == seed["given"]["transition_space"] == "knn"
    assert finite(seed["auto"]["transition_error"], 0, 1) and finite(seed["given"]["transition_error"], 0, 1)
    for decision in ("mixture", "quota", "threshold"):
        assert accuracy(seed["auto_by_decision"][decision]["f1"]), decision
    assert finite(seed["auto"]["seconds_detection"], 0) and finite(seed["cleanlab"]["seconds_total"], 0)
    assert "## pairs40" in md and "auto, given model" in md


def test_attribution_cost_quick(tmp_path):
    data, md = run_quick("attribution_cost", tmp_path, runs=False)
    assert set(data) == {"meta", "runs"}
    assert [r["model"] for r in data["runs"]] == ["cnn_small", "resnet18_cifar"]
    for run in data["runs"]:
        # raypipe's batched paper rule equals the published per-class backward pass.
        assert finite(run["max_abs_diff_published_vs_raypipe"], 0, 1e-4)
        assert "inference (no_grad forward)" in run["methods"]
        for method, m in run["methods"].items():
            assert finite(m["samples_per_s"], 0) and finite(m["x_inference"], 0), method
    assert "## cnn_small" in md


def test_lft_cost_quick(tmp_path):
    data, md = run_quick("lft_cost", tmp_path, runs=False)
    assert [r["model"] for r in data["runs"]] == ["mlp", "cnn_small", "resnet18_cifar"]
    for run in data["runs"]:
        # The head is part of the model: its FLOPs per step are a positive fraction of the whole model's.
        assert finite(run["flops_floor"], 0, 1) and run["flops_floor"] > 0, run["model"]
        assert finite(run["lft_epoch_s"], 0) and finite(run["full_epoch_s"], 0)
        assert math.isclose(run["lft_over_full"], run["lft_epoch_s"] / run["full_epoch_s"])
    by_model = {r["model"]: r for r in data["runs"]}
    # The MLP's backbone is one layer, so its head is most of it; ResNet-18's head is a sliver.
    assert by_model["mlp"]["flops_floor"] > 0.3 > 0.01 > by_model["resnet18_cifar"]["flops_floor"]
    assert "FLOPs floor" in md


def test_detection_ceiling_quick(tmp_path):
    data, md = run_quick("detection_ceiling", tmp_path)
    assert list(data["results"]) == ["sym40", "pairs40"]
    for noise, per_seed in data["results"].items():
        run = per_seed["0"]
        assert accuracy(run["clean_oof_accuracy"]) and finite(run["seconds_cross_fit"], 0)
        # 40% of the flipped classes' samples: every class under sym40, 5 of 10 under pairs40.
        assert abs(run["noise_rate"] - {"sym40": 0.4, "pairs40": 0.2}[noise]) < 0.03, noise
        for row in ("bayes_0.5", "bayes_quota", "doubt_quota"):
            assert accuracy(run[row]["f1"]) and accuracy(run[row]["auroc"]), (noise, row)
        # Quotas flag each class's true share of wrong labels: as many flags as wrong labels, up to rounding.
        assert abs(run["bayes_quota"]["n_flagged"] - round(run["noise_rate"] * 600)) <= 10
    assert "Against the goals: within reach?" in md and "| sym40 | 1 |" in md


def test_scale_quick(tmp_path):
    data, md = run_quick("scale", tmp_path)
    assert set(data) == {"meta", "results", "source"}
    assert [(r["rows"], r["executor"]) for r in data["results"]] == [(500, "local"), (5000, "local")]
    for r in data["results"]:
        assert "error" not in r, r.get("error")
        for key in ("rss_baseline_mib", "partition_rss_peak_mib", "prune_rss_peak_mib", "partition_seconds"):
            assert finite(r[key], 0), key
        assert r["prune_rss_peak_mib"] >= r["rss_baseline_mib"]
    assert "driver peak memory grows" in md


@pytest.mark.ray
def test_ray_vs_local_quick(tmp_path):
    data, md = run_quick("ray_vs_local", tmp_path)
    assert set(data) == {"meta", "sizes", "ratios", "attribution"}
    (size,) = data["sizes"]
    assert [r["executor"] for r in size["runs"]] == ["local", "ray"]
    for run in size["runs"]:  # the whole pipeline, every route, both ways (on Ray the routes end in any order)
        assert run["stages_ran"][:5] == ["data", "initial", "attribution", "partition", "prune"]
        assert sorted(run["stages_ran"][5:]) == sorted(REPAIR_ROUTES)
        assert all(accuracy(a) for a in run["accuracy"].values()) and finite(run["total_seconds"], 0)
        assert all(finite(s, 0) for s in run["route_seconds"].values()) and finite(run["driver_peak_rss_mib"], 100)
    local, ray = size["runs"]
    assert local["routes_overlapped"] == {}  # one process: one route after the other
    assert ray["accuracy"] == pytest.approx(local["accuracy"], abs=0.005)  # the same computation
    ratios = data["ratios"][str(size["n"])]
    assert finite(ratios["**total wall**"], 0) and finite(ratios["attribution"], 0)
    setups = data["attribution"]
    assert list(setups) == ["in-process", "Ray, 1 actor", "Ray, 2 actors", "2-node cluster"]
    assert all(finite(r["samples_per_s"], 0) and r["rows"] == local["rows"] for r in setups.values())
    assert setups["2-node cluster"]["nodes"] == 3  # a head and two worker nodes
    assert "**total wall**" in md and "### Attribution samples / s" in md and "L-FT epoch" in md


@pytest.mark.ray
def test_gpu_quick(tmp_path):
    """The GPU script's whole run on CPUs (cnn_small, a few hundred synthetic images)."""
    data, md = run_quick("gpu", tmp_path)
    assert set(data) == {"meta", "gpus", "gpu_names", "throughput", "wall_seconds", "report"}
    assert set(data["throughput"]) == {"attribution", "initial", *REPAIR_ROUTES}
    assert all(finite(r["samples_per_s_per_gpu"], 0) for r in data["throughput"].values())
    assert data["throughput"]["attribution"]["samples"] == data["report"]["data"]["rows"]["train"]
    assert finite(data["wall_seconds"], 0, 600) and "samples / s per GPU" in md


def test_missing_fashion_mnist(monkeypatch, tmp_path):
    """--quick falls back to digits; a full run stops with the line that installs the data."""
    spec = importlib.util.spec_from_file_location("bench_common", BENCH / "common.py")
    common = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, common)  # its dataclasses look their module up there
    spec.loader.exec_module(common)
    monkeypatch.setattr(common, "DEBIAN_FASHION_MNIST", tmp_path / "fashion-mnist")
    assert common.choose_data(quick=True) == "digits"
    with pytest.raises(SystemExit, match="apt-get install -y dataset-fashion-mnist"):
        common.choose_data(quick=False)


def test_prune_activation_quick(tmp_path):
    data, md = run_quick("prune_activation", tmp_path)
    (seed,) = data["per_seed"]["sym40"].values()
    routes = {"l_ft", "f_ft", "relabel"}
    for start in ("unpruned", "pre_relu", "post_relu"):
        assert set(seed[start]["accuracy"]) == routes and all(accuracy(a) for a in seed[start]["accuracy"].values())
    assert seed["unpruned"]["n_pruned"] == 0 and seed["pre_relu"]["n_pruned"] == seed["post_relu"]["n_pruned"] > 0
    # the post-ReLU rule's neurons were chosen by what the head sees; they are stored, and fire on some samples
    assert finite(seed["post_relu"]["firing_share"], 0.0, 1.0) and seed["post_relu"]["firing_share"] > 0
    assert 0 <= seed["overlap"] <= seed["pre_relu"]["n_pruned"]
    assert "pruned post-ReLU - unpruned" in md


def test_matched_budget_quick(tmp_path):
    data, md = run_quick("matched_budget", tmp_path)
    assert set(data) == {"meta", "summary", "per_seed"}
    (seed,) = data["per_seed"]["sym40"].values()
    rows = seed["rows"]
    assert set(rows) == {f"{r}/{s}" for r in ("l_ft", "f_ft", "relabel") for s in ("pruned", "unpruned")}
    epochs = seed["initial"]["epochs"]
    for name, row in rows.items():
        assert accuracy(row["accuracy"]) and accuracy(row["retrain_matched"]) and finite(row["seconds"], 0), name
        assert 1 <= row["retrain_matched_epochs"] <= epochs, name  # the time budget never adds epochs
    assert accuracy(seed["oracle"]["accuracy"]) and accuracy(seed["retrain_full"]["accuracy"])
    assert seed["retrain_full"]["epochs"] == epochs
    choice, test = seed["choice"], seed["test"]
    assert choice["route"] in test and seed["test_best"] in test
    assert finite(choice["loss"], 0.0, 1.0)  # test accuracy given up by choosing without the test split
    # every candidate was scored on the validation split (given labels, and corrected by the estimated noise) and on
    # its samples detected as clean, none on the test split; every rule picked one of them
    assert set(choice["evidence"]) == set(test)
    assert all(0 < e["n_cleaned"] <= e["n"] and finite(e["accuracy_corrected"]) for e in choice["evidence"].values())
    assert set(choice["by_rule"]) == {"given", "corrected", "cleaned"}
    for rule, pick in choice["by_rule"].items():
        assert pick["route"] in test and pick["loss"] == test[seed["test_best"]] - test[pick["route"]], rule
    summary = data["summary"]["sym40"]
    assert summary["best_route"] in rows and all(finite(v) for v in summary["rows"]["f_ft/pruned"]["gap"])
    assert "## sym40" in md and "Retrain same wall" in md and "Pruning on - off" in md
    log = (tmp_path / "runs" / "matched_budget_quick" / "sym40" / "seed0" / "log.txt").read_text()
    assert "[initial]" in log and "[retrain]" in log  # the seed's log survives the emptying of its folder
    # --merge: one table from the per-seed results of earlier runs, running nothing; the seeds it read, summarized
    # the same way (here one run merged with itself under another seed number)
    second = json.loads(json.dumps(data).replace('"0": {', '"7": {', 1))
    (tmp_path / "second.json").write_text(json.dumps(second))
    merged_dir = tmp_path / "merged"
    sources = f"{tmp_path / 'results' / 'matched_budget_quick.json'},{tmp_path / 'second.json'}"
    cmd = [sys.executable, str(BENCH / "matched_budget.py"), "--quick", "--merge", sources]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    p = subprocess.run([*cmd, "--results", str(merged_dir)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    merged = json.loads((merged_dir / "matched_budget_quick.json").read_text())
    assert sorted(merged["per_seed"]["sym40"]) == ["0", "7"] and merged["meta"]["params"]["seeds"] == {"sym40": [0, 7]}
    both = merged["summary"]["sym40"]
    assert both["n_seeds"] == 2 and both["rows"]["f_ft/pruned"]["accuracy"][0] == pytest.approx(
        summary["rows"]["f_ft/pruned"]["accuracy"][0]
    )
    assert both["rows"]["f_ft/pruned"]["accuracy"][1] == pytest.approx(0.0)  # the same seed twice: no spread
