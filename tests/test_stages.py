"""Stage functions in-process (no Ray): trajectory recording during training, L-FT on the features the
attribution pass kept, and the partition stage's detection signals."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch

import raypipe
from raypipe import layout, storage
from raypipe.config import load_config
from raypipe.core.detection.trajectory import margins_and_losses
from raypipe.executors import LocalExecutor
from raypipe.layout import RunLayout
from raypipe.pipeline import Run, train_request
from raypipe.stages import data as prepare
from raypipe.stages.attribution import shards as attribution_shards
from raypipe.stages.train import TrainRequest, route_data, train_local
from raypipe.tables import columns_from_table
from raypipe.training.checkpoint import load_model
from raypipe.training.loop import CachedFeatures, InMemory, predict_logits

QUIET = {"log": lambda *_: None}


@pytest.fixture(scope="module")
def data_uri(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("data"))
    config = load_config(None, ["data.max_train_samples=300"])
    prepare.run(config.data, config.noise, out, **QUIET)
    return out, config


def _train(data_uri, config, out, epochs, trajectory_epochs, early_model_epoch=0):
    cfg = load_config(None, [f"initial.epochs={epochs}"]).initial
    request = TrainRequest(
        "initial",
        cfg,
        data_uri,
        out,
        config.model,
        0,
        trajectory_epochs=trajectory_epochs,
        early_loss_epoch=1,
        early_model_epoch=early_model_epoch,
    )
    train_local(request, **QUIET)
    model, _, _ = load_model(layout.model_file(out))
    return model


def test_recorded_trajectory_equals_recomputation_from_checkpoints(data_uri, tmp_path):
    """AUM and wrong events recorded during 2 epochs = the mean margin and the count of wrong predictions of the
    epoch-1 and epoch-2 models, recomputed from their checkpoints (training is seeded, so the 1-epoch run is the
    2-epoch run's first epoch); the early model kept after epoch 1 is that epoch-1 model."""
    uri, config = data_uri
    train = prepare.read_split(uri, "train")
    model_1 = _train(uri, config, str(tmp_path / "e1"), epochs=1, trajectory_epochs=0)
    model_2 = _train(uri, config, str(tmp_path / "e2"), epochs=2, trajectory_epochs=2, early_model_epoch=1)
    margins, losses, wrong = [], [], []
    for model in (model_1, model_2):
        logits = predict_logits(model, train.x, 512, "cpu")
        m, loss = margins_and_losses(logits, train.label)
        margins.append(m)
        losses.append(loss)
        wrong.append(logits.argmax(axis=1) != train.label)
    recorded = columns_from_table(storage.read_table(layout.trajectory_file(str(tmp_path / "e2"))))
    assert np.array_equal(recorded["sample_id"], train.sample_id)
    np.testing.assert_allclose(recorded["aum"], (margins[0] + margins[1]) / 2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(recorded["early_loss"], losses[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(recorded["wrong_events"], wrong[0].astype(int) + wrong[1])
    np.testing.assert_array_equal(recorded["epochs_recorded"], np.full(len(train), 2))
    assert 0 < recorded["wrong_events"].mean() < 2
    early, _, extra = load_model(layout.early_model_file(str(tmp_path / "e2")))
    assert extra["epoch"] == 1
    for name, value in early.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), model_1.state_dict()[name].numpy(), err_msg=name)
    # Not recorded, nor kept, when not asked for.
    assert not storage.exists(layout.trajectory_dir(str(tmp_path / "e1")))
    assert not storage.exists(layout.early_model_file(str(tmp_path / "e1")))


def test_l_ft_trains_on_the_features_the_attribution_kept(tmp_path):
    """With L-FT among the routes the attribution pass keeps the backbone's output of every training sample;
    L-FT trains the head on it (no image read, no backbone pass) and ends with the head it trains from the
    samples themselves."""
    config = load_config(None, ["initial.epochs=4", "l_ft.epochs=3", "run.routes=[l_ft]"])
    lay = RunLayout(str(tmp_path / "run"))
    raypipe.run(config, lay.root, **QUIET)
    initial = load_model(lay.model("initial"))[0].eval()
    shards = attribution_shards(lay.stage("attribution"))
    kept = [columns_from_table(storage.read_table(layout.features_shard(uri))) for uri in shards]
    assert len(kept) == len(shards) >= 1
    train = prepare.read_split(lay.stage("data"), "train")
    assert np.array_equal(np.concatenate([k["sample_id"] for k in kept]), train.sample_id)
    with torch.no_grad():
        expected = initial.features(torch.tensor(train.x)).numpy()
    np.testing.assert_allclose(np.concatenate([k["features"] for k in kept]), expected, rtol=1e-5, atol=1e-5)

    request = train_request(Run(config, lay, LocalExecutor(**QUIET), **QUIET), "l_ft", lay.stage("l_ft"))
    data, n_train = route_data(request)
    assert isinstance(data, CachedFeatures) and data.held() is None  # the features, not the samples
    assert n_train == storage.read_manifest(lay.stage("partition"))["summary"]["n_clean"]
    # The same route without them: features computed from the samples at its first epoch.
    again = dataclasses.replace(request, out_uri=str(tmp_path / "l_ft_from_samples"), attribution_uri=None)
    assert isinstance(route_data(again)[0], InMemory)
    train_local(again, **QUIET)
    from_features, from_samples = load_model(lay.model("l_ft"))[0], load_model(layout.model_file(again.out_uri))[0]
    for (name, a), b in zip(from_features.state_dict().items(), from_samples.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    # A run without L-FT keeps no features.
    other = RunLayout(str(tmp_path / "f_ft_only"))
    raypipe.run(load_config(None, ["initial.epochs=1", "f_ft.epochs=1", "run.routes=[f_ft]"]), other.root, **QUIET)
    assert not storage.exists(layout.features_dir(other.stage("attribution")))


@pytest.fixture(scope="module")
def memorized_run(tmp_path_factory):
    """Digits, 40% symmetric noise, a model trained until it fits most of its wrong labels."""
    out = str(tmp_path_factory.mktemp("memorized") / "run")
    overrides = ["initial.epochs=150", "initial.lr=0.003", "attribution.rule=grad_x_act_maxclass", "run.routes=[]"]
    raypipe.run(load_config(None, [*overrides, "detection.signal=auto"]), out, **QUIET)
    return out, overrides


@pytest.mark.parametrize("signal", ["attribution", "knn", "fine", "trajectory", "auto"])
def test_partition_signals_on_a_memorized_model(memorized_run, tmp_path, signal):
    """The label-blind attribution is near chance on a memorized model; neighbour agreement and the
    training trajectory still find the noise. Only the partition reruns per signal."""
    base, overrides = memorized_run
    out = str(tmp_path / "run")
    shutil.copytree(base, out)
    logs: list[str] = []
    report = raypipe.run(load_config(None, [*overrides, f"detection.signal={signal}"]), out, log=logs.append)
    assert any("[initial] up to date, skipped" in line for line in logs)
    assert report["routes"]["initial"]["train_accuracy_given_labels"] > 0.9  # memorized the noisy labels
    det = report["detection"]
    assert det["signals_used"]["signal"] == signal
    by_signal = det["auroc_by_signal"]
    assert by_signal["aum"] > 0.9  # the trajectory is recorded whatever the signal
    if signal == "attribution":
        assert det["auroc"] < 0.75  # the paper's rule cannot see label noise in a memorized model
    else:
        assert det["auroc"] > 0.9 and det["f1"] > 0.8, det
    issues = columns_from_table(storage.read_table(layout.label_issues_file(str(tmp_path / "run" / "partition"))))
    assert len(issues["sample_id"]) == report["partition"]["n_clean"] + report["partition"]["n_noisy"]  # every row
    assert issues["is_label_issue"].sum() == report["partition"]["n_noisy"]
    flagged = issues["is_label_issue"]
    assert flagged[: flagged.sum()].all()  # the flagged rows first, each group most suspect first
    assert np.all(np.diff(issues["label_score"][flagged]) > 0) and np.all(np.diff(issues["label_score"][~flagged]) > 0)
    assert (issues["suggested_label"][flagged] != issues["given_label"][flagged]).all()


def test_a_given_model_uses_what_exists_and_the_report_says_so(memorized_run, tmp_path):
    """model.checkpoint: no trajectory, no early checkpoint; auto decides from kNN, FINE and the rest, the noise
    transition estimate is made in the final probe space, and report.md names what was missing and why."""
    base, overrides = memorized_run
    given = layout.model_file(str(base) + "/initial")
    out = tmp_path / "given"
    report = raypipe.run(load_config(None, [*overrides, f"model.checkpoint={given}"]), str(out), **QUIET)
    used = report["detection"]["signals_used"]
    assert set(used["missing"]) == {"trajectory", "knn_early"}
    assert "model.checkpoint is given" in used["missing"]["trajectory"]
    available = set(report["detection"]["auroc_by_signal"])
    assert {"knn", "fine", "loss", "attribution"} <= available
    assert not available & {"aum", "early_loss", "wrong_events", "knn_early"}
    assert set(used["chosen"]) <= available
    transition = report["detection"]["transition_matrix"]
    assert transition["space"] == "knn" and 0 <= transition["error"] < 0.05  # symmetric 40%: T is near its truth
    assert not transition["structure"]["class_dependent"] and used["decision_taken"] == "mixture"
    assert report["detection"]["f1"] > 0.8
    markdown = (out / "report.md").read_text()
    assert "no `trajectory` signal: model.checkpoint is given" in markdown
    assert f"Decision: `{used['decision_taken']}`" in markdown
    assert "plots/transition_matrix.png" in report["plots"] and (out / "plots" / "transition_matrix.png").is_file()
