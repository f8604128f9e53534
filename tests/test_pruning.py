"""Pruning is persistent: no optimizer, weight decay or momentum revives a pruned neuron."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raypipe.config import ModelConfig, TrainConfig
from raypipe.core.models import ProbedModel, build_model, model_signature
from raypipe.core.pruning import prune_neurons, pruned_mask
from raypipe.training.checkpoint import load_model, save_model
from raypipe.training.loop import train_arrays

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE, CLASSES = (1, 4, 4), 3
MODEL_CFG = ModelConfig(name="mlp", probe_width=8, hidden_width=12)
PRUNED = [1, 4, 6]


def _data(n: int = 96, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, size=n)
    x = (rng.normal(size=(n, *SHAPE)) + y[:, None, None, None]).astype(np.float32)
    return x, y


def _pruned_model(seed: int = 0) -> ProbedModel:
    torch.manual_seed(seed)
    model = build_model(MODEL_CFG, SHAPE, CLASSES)
    prune_neurons(model, np.array(PRUNED))
    return model


def _assert_pruned(model: ProbedModel, x: np.ndarray) -> None:
    model.eval()
    xt = torch.as_tensor(x)
    assert pruned_mask(model).tolist() == [j in PRUNED for j in range(MODEL_CFG.probe_width)]
    with torch.no_grad():
        h = model.probe(model.features(xt))
        assert torch.all(h[:, PRUNED] == 0)
        assert torch.all(h[:, [j for j in range(8) if j not in PRUNED]] != 0)
        before = model(xt).clone()
        # whatever the pruned neurons' incoming weights become, the logits do not move
        model.fc.weight[PRUNED] = torch.randn(len(PRUNED), model.fc.in_features) * 10
        model.fc.bias[PRUNED] = 5.0
        assert torch.equal(model(xt), before)
        assert torch.all(model.probe(model.features(xt))[:, PRUNED] == 0)


def test_prune_neurons_zeroes_mask_and_weights():
    model = _pruned_model()
    assert model.probe_mask[PRUNED].eq(0).all() and model.probe_mask.sum() == 8 - len(PRUNED)
    assert model.fc.weight[PRUNED].eq(0).all() and model.fc.bias[PRUNED].eq(0).all()
    assert model.fc2.weight[:, PRUNED].eq(0).all()
    assert model.fc.weight[0].ne(0).any()
    x, _ = _data(16)
    _assert_pruned(model, x)


@pytest.mark.parametrize(
    "train_cfg",
    [
        TrainConfig(epochs=3, optimizer="adam", lr=1e-2, batch_size=16),
        TrainConfig(epochs=3, optimizer="adam", lr=1e-2, weight_decay=1e-2, batch_size=16),
        TrainConfig(epochs=3, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-2, batch_size=16),
    ],
    ids=["adam", "adam_wd", "sgd_momentum_wd"],
)
def test_pruned_neurons_stay_zero_through_f_ft(train_cfg):
    x, y = _data()
    model = _pruned_model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    train_arrays(model, x, y, train_cfg, route="f_ft", device=torch.device("cpu"))
    state = model.state_dict()
    assert not torch.equal(state["fc.weight"], start["fc.weight"])  # training did happen (18 steps)
    assert not torch.equal(state["backbone.1.weight"], start["backbone.1.weight"])
    # the pruned rows get no gradient at all, so even their stored weights stay 0
    assert state["fc.weight"][PRUNED].eq(0).all() and state["fc2.weight"][:, PRUNED].eq(0).all()
    assert torch.equal(state["probe_mask"], start["probe_mask"])
    _assert_pruned(model, x)


def test_pruning_survives_checkpoint_round_trip(tmp_path):
    x, y = _data()
    model = _pruned_model()
    train_arrays(model, x, y, TrainConfig(epochs=1, lr=1e-2, batch_size=32), route="f_ft", device=torch.device("cpu"))
    uri = str(tmp_path / "pruned.pt")
    signature = model_signature(MODEL_CFG, SHAPE, CLASSES)
    save_model(uri, model, signature, {"pruned": PRUNED})
    loaded, saved_signature, extra = load_model(uri, expect=signature)
    assert saved_signature == signature and extra == {"pruned": PRUNED}
    assert torch.equal(loaded.probe_mask, model.probe_mask)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(torch.as_tensor(x)), model(torch.as_tensor(x)))
    _assert_pruned(loaded, x)
    # and it stays pruned when fine-tuned again after loading
    train_arrays(
        loaded, x, y, TrainConfig(epochs=2, optimizer="sgd", lr=0.1, weight_decay=1e-2, batch_size=16), "f_ft", "cpu"
    )
    _assert_pruned(loaded, x)
