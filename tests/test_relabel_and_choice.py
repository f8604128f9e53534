"""The relabel route's labels, the validation split's detection carried over from the training split, the
route recommended without the test split, and the training time budget: pure functions on known answers, and
one planted run (in-process, digits) where the test-best route is known."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import raypipe
from raypipe import layout, storage
from raypipe.config import load_config
from raypipe.core.choice import noise_corrected_accuracy, recommend_route
from raypipe.core.detection.relabel import confident_relabels, suggestion_accuracy, vote_shares
from raypipe.core.detection.transfer import fit_transfer
from raypipe.errors import ConfigError
from raypipe.layout import RunLayout, SweepLayout
from raypipe.stages.partition import read_partition
from raypipe.stages.train import TrainRequest, training_samples
from raypipe.sweep.space import load_sweep_config
from raypipe.sweep.trial import validation_uri
from raypipe.tables import columns_from_table
from raypipe.training.callbacks import TimeBudget
from raypipe.training.loop import Callback, LoopState, train_arrays

QUIET = {"log": lambda *_: None}


# ---------------------------------------------------------------------------------------------
# Relabel: which flagged rows get a new label.


def test_confident_relabels_on_known_answers():
    given = np.array([0, 0, 1, 1, 2, 2])
    flagged = np.array([True, True, True, True, True, False])
    final = np.array([1, 1, 1, 0, 0, 0])  # row 2: the suggestion is the given label; row 5 is not flagged
    early = np.array([1, 2, 1, 0, 0, 0])  # row 1: the two spaces disagree
    shares = np.full((6, 3), 0.0)
    shares[np.arange(6), final] = [0.8, 0.9, 0.9, 0.7, 0.4, 0.9]  # row 4: too few votes (0.4 < 0.5)
    out = confident_relabels(given, flagged, [final, early], [shares, shares], min_vote_share=0.5)
    np.testing.assert_array_equal(out, [1, -1, -1, 0, -1, -1])
    # one space alone decides with its own votes; no space: nothing is relabelled
    np.testing.assert_array_equal(confident_relabels(given, flagged, [final], [shares], 0.5), [1, 1, -1, 0, -1, -1])
    np.testing.assert_array_equal(confident_relabels(given, flagged, [], [], 0.5), np.full(6, -1))


def test_vote_shares_and_suggestion_accuracy():
    np.testing.assert_allclose(vote_shares(np.array([[3, 1], [0, 0]])), [[0.75, 0.25], [0.0, 0.0]])
    true = np.array([1, 1, 2, 0])
    suggested = np.array([1, 0, 2, 0])
    relabelled = np.array([1, -1, 0, -1])
    flagged = np.array([True, True, True, False])
    corrupted = np.array([True, False, True, False])
    got = suggestion_accuracy(suggested, relabelled, flagged, true, corrupted)
    assert got["n_flagged"] == 3 and got["n_relabelled"] == 2
    assert got["suggested_accuracy_flagged"] == pytest.approx(2 / 3)
    assert got["suggested_accuracy_flagged_corrupted"] == pytest.approx(1.0)
    assert got["relabel_accuracy"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------
# The training split's decision carried over to the validation split.


def _signals(n: int, seed: int):
    rng = np.random.default_rng(seed)
    noisy = rng.random(n) < 0.3
    labels = rng.integers(0, 3, n)
    knn = np.where(noisy, rng.normal(0.8, 0.05, n), rng.normal(0.2, 0.05, n))
    return {"knn": knn, "fine": rng.normal(size=n)}, labels, noisy


def test_transfer_reproduces_a_separable_decision_on_new_rows_row_by_row():
    signals, labels, noisy = _signals(400, 0)
    transfer = fit_transfer(signals, labels, noisy, num_classes=3)
    val, val_labels, val_noisy = _signals(200, 1)
    p = transfer.p_noisy(val, val_labels)
    np.testing.assert_array_equal(p >= 0.5, val_noisy)
    # fitted on the training rows only: a validation row's p_noisy does not depend on the other validation rows
    half = {k: v[:50] for k, v in val.items()}
    np.testing.assert_allclose(transfer.p_noisy(half, val_labels[:50]), p[:50], rtol=1e-6)


def test_transfer_of_a_constant_decision_is_that_constant():
    signals, labels, _ = _signals(50, 0)
    assert (fit_transfer(signals, labels, np.zeros(50, bool), 3).p_noisy(signals, labels) == 0).all()
    assert (fit_transfer(signals, labels, np.ones(50, bool), 3).p_noisy(signals, labels) == 1).all()


# ---------------------------------------------------------------------------------------------
# The route recommended from the cleaned-val scores.


def test_recommend_route_picks_the_best_and_the_first_on_a_tie():
    scores = {"initial": {"accuracy": 0.7, "n": 10}, "f_ft": {"accuracy": 0.9, "n": 10}}
    assert recommend_route({**scores, "retrain": {"accuracy": 0.8, "n": 10}})["route"] == "f_ft"
    tie = recommend_route({**scores, "relabel": {"accuracy": 0.9, "n": 10}})
    assert tie["route"] == "f_ft" and "tied with relabel" in tie["why"]
    assert recommend_route({**scores, "relabel": {"accuracy": 0.95, "n": 10}})["route"] == "relabel"
    assert recommend_route({})["route"] is None
    assert recommend_route({"f_ft": {"accuracy": 0.9, "n": 0}})["route"] is None


def test_recommend_route_reads_the_score_its_rule_names():
    scores = {
        "l_ft": {"accuracy": 0.9, "n": 10, "accuracy_corrected": 0.80, "accuracy_cleaned": 0.99, "n_cleaned": 6},
        "f_ft": {"accuracy": 0.8, "n": 10, "accuracy_corrected": 0.85, "accuracy_cleaned": 0.90, "n_cleaned": 6},
        "retrain": {"accuracy": 0.7, "n": 10, "accuracy_corrected": 0.95},  # no cleaned score: not a candidate there
    }
    assert recommend_route(scores)["route"] == "l_ft"  # the product's rule: given labels
    corrected = recommend_route(scores, "corrected")
    assert corrected["route"] == "retrain" and corrected["rule"] == "corrected" and "corrected" in corrected["why"]
    cleaned = recommend_route(scores, "cleaned")
    assert (cleaned["route"], cleaned["n"]) == ("l_ft", 6)
    nan = {r: {**s, "accuracy_corrected": float("nan")} for r, s in scores.items()}
    assert recommend_route(nan, "corrected")["route"] is None  # no estimate of T: the rule has nothing to read


def _noisy_labels(true: np.ndarray, t: np.ndarray, rng) -> np.ndarray:
    """Given labels drawn from row true[n] of T [C, C]."""
    cumulative = t.cumsum(axis=1)[true]
    return (rng.random(len(true))[:, None] > cumulative).sum(axis=1).clip(0, t.shape[0] - 1)


def test_noise_corrected_accuracy_recovers_the_true_accuracy_and_ranking_under_class_pair_noise():
    rng = np.random.default_rng(0)
    c, n = 4, 400_000
    t = np.eye(c)
    t[0, 0], t[0, 1] = 0.6, 0.4  # class 0 -> 1 flipped 40% of the time, the other classes kept
    true = rng.integers(0, c, n)
    given = _noisy_labels(true, t, rng)
    # Route A errs on 10% of class 1 (given labels all right there: every mistake costs 1 point of noisy accuracy);
    # route B errs on 20% of class 0, calling it 1 (costs only T[0,0] - T[0,1] = 0.2 of noisy accuracy each).
    a, b = true.copy(), true.copy()
    ones, zeros = np.flatnonzero(true == 1), np.flatnonzero(true == 0)
    a[ones[: len(ones) // 10]] = 2
    b[zeros[: len(zeros) // 5]] = 1
    clean = {"a": (a == true).mean(), "b": (b == true).mean()}
    noisy = {"a": (a == given).mean(), "b": (b == given).mean()}
    corrected = {"a": noise_corrected_accuracy(a, given, t), "b": noise_corrected_accuracy(b, given, t)}
    assert clean["a"] > clean["b"] and noisy["a"] < noisy["b"]  # the given labels rank the two wrongly
    assert corrected["a"] > corrected["b"]  # the correction ranks them as the true labels do
    for r in ("a", "b"):
        assert corrected[r] == pytest.approx(clean[r], abs=0.005)
    # T = I (no noise) changes nothing; a singular T gives no estimate rather than a wild one
    assert noise_corrected_accuracy(a, true, np.eye(c)) == pytest.approx(clean["a"])
    half = np.eye(c)
    half[0, :2] = 0.5
    half[1, :2] = 0.5
    assert np.isnan(noise_corrected_accuracy(a, given, half))


# ---------------------------------------------------------------------------------------------
# The time budget of the one training loop.


def test_time_budget_stops_before_an_epoch_that_would_end_past_it():
    state = LoopState(epoch=3, seconds_train=3.0)
    budget = TimeBudget(3.5)
    budget.on_epoch_end(3, {}, state)
    assert state.stop  # 3 s + 1 s per epoch > 3.5 s
    state = LoopState(epoch=3, seconds_train=3.0)
    TimeBudget(4.5).on_epoch_end(3, {}, state)
    assert not state.stop


def test_the_loop_ends_when_a_callback_stops_it():
    class StopAt(Callback):
        def on_epoch_end(self, epoch, metrics, state):
            state.stop = epoch == 2

    x = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    from raypipe.config import ModelConfig, TrainConfig
    from raypipe.core.models import build_model

    model = build_model(ModelConfig(probe_width=8, hidden_width=8), (4,), 2)
    state = train_arrays(model, x, y, TrainConfig(epochs=5, batch_size=8), "f_ft", callbacks=[StopAt()])
    assert state.epoch == 2 and len(state.history) == 2


def test_new_settings_are_checked_with_the_key_named():
    with pytest.raises(ConfigError, match="partition.relabel_min_vote_share"):
        load_config(None, ["partition.relabel_min_vote_share=0"])
    with pytest.raises(ConfigError, match="retrain.time_budget_s"):
        load_config(None, ["retrain.time_budget_s=-1"])
    assert load_config(None, ["retrain.time_budget_s=12.5"]).retrain.time_budget_s == 12.5


# ---------------------------------------------------------------------------------------------
# A planted run: F-FT is known to be the test-best route.

PLANTED = [
    "data.max_train_samples=900",
    "initial.epochs=2",  # an undertrained Initial, so that a well-trained repair is far better on test
    "f_ft.epochs=12",
    "relabel.epochs=1",
    "relabel.lr=1e-6",  # barely moves from the pruned Initial
    "l_ft.epochs=1",
    "l_ft.lr=1e-6",
    "retrain.epochs=1",
    "retrain.lr=1e-6",  # a fresh model barely trained: near chance
]


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("planted"))
    report = raypipe.run(load_config(None, PLANTED), out, **QUIET)
    return out, report


def test_recommended_route_is_the_test_best_and_never_reads_the_test_split(planted_run, tmp_path):
    from raypipe.report.choice import recommendation

    out, report = planted_run
    test_acc = {r: s["accuracy"] for r, s in report["routes"].items()}
    best = max(test_acc, key=test_acc.get)
    assert best == "f_ft" and test_acc["f_ft"] > max(v for r, v in test_acc.items() if r != "f_ft") + 0.02
    choice = report["recommended_route"]
    assert choice["route"] == "f_ft"
    assert set(choice["evidence"]) == set(test_acc) and all(s["n"] > 0 for s in choice["evidence"].values())
    # chosen on the whole validation split (given labels); the samples detected as clean are kept as evidence
    assert all(s["n"] == report["data"]["rows"]["val"] for s in choice["evidence"].values())
    assert report["validation_detection"]["n_clean"] == choice["evidence"]["f_ft"]["n_cleaned"]
    assert "validation samples (their given labels)" in choice["why"] and choice["rule"] == "given"
    # without the test split the choice and its evidence are the same: it was never read (on a copy of the run)
    shutil.copytree(out, tmp_path / "run")
    lay = RunLayout(str(tmp_path / "run"))
    storage.remove_tree(layout.split_dir(lay.stage("data"), "test"))
    assert recommendation(lay, list(test_acc)) == choice


def test_relabel_route_trains_on_the_clean_part_plus_the_relabelled(planted_run):
    out, report = planted_run
    lay = RunLayout(out)
    cols = columns_from_table(read_partition(lay.stage("partition"), ["sample_id", "is_clean", "relabelled_to"]))
    moved = cols["relabelled_to"] >= 0
    assert moved.any() and not (moved & cols["is_clean"]).any()  # only flagged samples are relabelled
    cfg = load_config(None, PLANTED)
    request = TrainRequest(
        "relabel", cfg.relabel, lay.stage("data"), lay.stage("relabel"), cfg.model, 0, lay.stage("partition")
    )
    samples = training_samples(request)
    assert len(samples) == int(cols["is_clean"].sum() + moved.sum()) == report["routes"]["relabel"]["n_train"]
    new = dict(zip(cols["sample_id"][moved], cols["relabelled_to"][moved], strict=True))
    got = {int(i): int(label) for i, label in zip(samples.sample_id, samples.label, strict=True) if i in new}
    assert got == {int(k): int(v) for k, v in new.items()}
    relabel = report["relabel"]
    assert relabel["n_relabelled"] == int(moved.sum())
    assert 0.0 <= relabel["suggested_accuracy_flagged"] <= 1.0 and 0.0 <= relabel["relabel_accuracy"] <= 1.0


def test_sweep_objective_cleaned_scores_each_trial_on_its_own_cleaned_val(tmp_path):
    config = load_sweep_config(None, ["sweep.objective=cleaned"])
    trial = SweepLayout(str(tmp_path)).trial("t0", "loss")
    assert validation_uri(config, str(tmp_path), trial) == layout.cleaned_val_file(trial.stage("partition"))
    noisy = load_sweep_config(None, ["sweep.objective=noisy"])
    assert validation_uri(noisy, str(tmp_path), trial).endswith("data/val/part-00000.parquet")


def test_retrain_with_a_time_budget_stops_early_and_publishes_its_model(planted_run, tmp_path):
    from raypipe.executors import LocalExecutor
    from raypipe.pipeline import Run

    out, _ = planted_run
    base = RunLayout(out)
    lay = RunLayout(str(tmp_path), {"data": base.stage("data"), "partition": base.stage("partition")})
    cfg = load_config(None, [*PLANTED, "retrain.epochs=5", "retrain.time_budget_s=0.001"])
    summary = Run(cfg, lay, LocalExecutor(**QUIET), **QUIET).run(["retrain"]).summary("retrain")
    assert summary["epochs"] == 1 and len(summary["history"]) == 1  # the first epoch always runs
    assert storage.exists(lay.model("retrain")) and not storage.exists(layout.checkpoint_file(lay.stage("retrain")))


def test_a_relabel_trial_with_the_cleaned_objective_scores_its_own_cleaned_val(tmp_path):
    """One sweep trial in this process (no Ray): the relabel route is a sweep choice, and with objective `cleaned`
    its per-epoch objective is the accuracy on the validation samples its own partition detected as clean."""
    from raypipe.data import samples_from_table
    from raypipe.executors import LocalExecutor
    from raypipe.sweep.space import TrialSpec
    from raypipe.sweep.trial import METRIC, prepare_base, run_trial
    from raypipe.training.checkpoint import load_model
    from raypipe.training.loop import evaluate, resolve_device

    config = load_sweep_config(
        None, ["data.max_train_samples=400", "initial.epochs=6", "sweep.objective=cleaned", "sweep.routes=[relabel]"]
    )
    reports = []
    sweep_uri, executor = str(tmp_path), LocalExecutor(QUIET["log"], report=reports.append)
    prepare_base(config, sweep_uri, LocalExecutor(**QUIET), **QUIET)
    spec = TrialSpec(lr=1e-3, epochs=2, route="relabel", rule="loss", tau=0.5, prune_fraction=0.156)
    run_trial(config, sweep_uri, "t0", spec, reports.append, executor, **QUIET)
    assert [r["epoch"] for r in reports] == [1, 2]
    trial = SweepLayout(sweep_uri).trial("t0", "loss")
    cleaned = samples_from_table(storage.read_table(layout.cleaned_val_file(trial.stage("partition"))))
    n_val = storage.read_manifest(trial.stage("data"))["summary"]["rows"]["val"]
    assert 0 < len(cleaned) < n_val
    model = load_model(trial.model("relabel"))[0]
    expected = evaluate(model, cleaned.x, cleaned.label, resolve_device("cpu"))["accuracy"]
    assert reports[-1][METRIC] == pytest.approx(expected)


def test_the_validation_detection_folders_each_read_whole_with_pandas(planted_run):
    import pandas as pd

    out, report = planted_run
    partition = RunLayout(out).stage("partition")
    detected = pd.read_parquet(storage.join(partition, "val"))
    cleaned = pd.read_parquet(storage.join(partition, "val_cleaned"))
    n_val = storage.read_manifest(RunLayout(out).stage("data"))["summary"]["rows"]["val"]
    assert len(detected) == n_val and detected["sample_id"].is_unique
    assert len(cleaned) == int(detected["is_clean"].sum()) == report["validation_detection"]["n_clean"]
    assert set(cleaned["sample_id"]) == set(detected["sample_id"][detected["is_clean"]])
    assert ((detected["p_noisy"] < 0.5) == detected["is_clean"]).all()
