"""attribute_batch (vmap / torch.func) against the slow per-sample, per-class reference loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raypipe.config import ModelConfig
from raypipe.core.attribution import RULES, attribute_batch, reference_attribution
from raypipe.core.models import ProbedModel, build_model
from raypipe.core.pruning import prune_neurons

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 4, 4)
PROBE, CLASSES, BATCH = 8, 5, 7
# Width of each rule's per-sample vector: the probe width d, 1, or the last layer's C*d + C parameters.
WIDTH = {
    "grad_x_act_maxclass": PROBE,
    "grad_x_act_label": PROBE,
    "loss": 1,
    "last_layer_grad": CLASSES * PROBE + CLASSES,
}
GRAD_RULES = ("grad_x_act_maxclass", "grad_x_act_label", "last_layer_grad")


def _model(seed: int = 0) -> ProbedModel:
    torch.manual_seed(seed)
    model = build_model(ModelConfig(name="mlp", probe_width=PROBE, hidden_width=16), SHAPE, CLASSES)
    return model.eval()


def _batch(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "sample_id": np.arange(100, 100 + BATCH),
        "x": rng.normal(size=(BATCH, *SHAPE)).astype(np.float32),
        "label": rng.integers(0, CLASSES, size=BATCH),
        "is_corrupted": rng.integers(0, 2, size=BATCH).astype(bool),
    }


def _reference(model: ProbedModel, batch: dict[str, np.ndarray], rule: str) -> np.ndarray:
    x = torch.as_tensor(batch["x"])
    y = torch.as_tensor(batch["label"], dtype=torch.long)
    return reference_attribution(model, x, y, rule).numpy()


def test_rules_cover_every_configured_rule():
    from raypipe.config import RULES as CONFIG_RULES

    assert set(RULES) == set(CONFIG_RULES)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_batched_rule_equals_reference_loop(rule):
    model, batch = _model(), _batch()
    out = attribute_batch(model, batch, rule)
    ref = _reference(model, batch, rule)
    assert out["attribution"].shape == (BATCH, WIDTH[rule])
    assert ref.shape == out["attribution"].shape
    assert torch.allclose(torch.as_tensor(out["attribution"]), torch.as_tensor(ref), atol=1e-5, rtol=1e-4)
    assert np.abs(ref).max() > 1e-3  # not trivially all zeros


@pytest.mark.parametrize("rule", GRAD_RULES)
def test_pruned_neuron_has_zero_attribution(rule):
    model, batch = _model(), _batch()
    pruned = [2, 5]
    prune_neurons(model, np.array(pruned))
    out = attribute_batch(model, batch, rule)["attribution"]
    if rule == "last_layer_grad":  # d(fc2.weight[c, j]) = dCE/dz_c * relu(h_j): zero for pruned j
        weight_grad = out[:, : CLASSES * PROBE].reshape(BATCH, CLASSES, PROBE)
        assert np.all(weight_grad[:, :, pruned] == 0.0)
        alive = [j for j in range(PROBE) if j not in pruned]
        assert np.abs(weight_grad[:, :, alive]).max() > 0
    else:
        assert np.all(out[:, pruned] == 0.0)
        assert np.abs(np.delete(out, pruned, axis=1)).max() > 0
    assert torch.allclose(torch.as_tensor(out), torch.as_tensor(_reference(model, batch, rule)), atol=1e-5)


@pytest.mark.parametrize("rule", ("grad_x_act_maxclass", "grad_x_act_label"))
def test_mask_alone_zeroes_attribution(rule):
    """Only the mask (weights left in place), as a model whose weights regrew would have."""
    model, batch = _model(), _batch()
    with torch.no_grad():
        model.probe_mask[3] = 0.0
    out = attribute_batch(model, batch, rule)
    assert np.all(out["probe"][:, 3] == 0.0)
    assert np.all(out["attribution"][:, 3] == 0.0)


def test_maxclass_closed_form():
    """z = W2 relu(h) + b2, so dz_c/dh_j * h_j = W2[c, j] * 1[h_j > 0] * h_j = W2[c, j] * relu(h_j), and
    A_j = | max_c W2[c, j] * relu(h_j) | (max first, then the absolute value)."""
    model, batch = _model(seed=3), _batch(seed=4)
    with torch.no_grad():
        model.fc2.weight[:, 0] = -torch.rand(CLASSES) - 0.1  # a column with only negative weights
        model.probe_mask[6] = 0.0
    out = attribute_batch(model, batch, "grad_x_act_maxclass")
    h = torch.as_tensor(out["probe"], dtype=torch.float64)  # [B, d]
    w2 = model.fc2.weight.detach().double()  # [C, d]
    expected = (w2.unsqueeze(0) * F.relu(h).unsqueeze(1)).amax(dim=1).abs()  # [B, d]
    assert (h < 0).any() and (h > 0).any()  # both ReLU branches are exercised
    assert torch.allclose(torch.as_tensor(out["attribution"], dtype=torch.float64), expected, atol=1e-6)
    # column 0: every W2[c, 0] < 0, so max_c is the least negative one, not the largest |W2[c, 0]|
    least_negative = w2[:, 0].max().abs()
    assert torch.allclose(
        torch.as_tensor(out["attribution"][:, 0], dtype=torch.float64), least_negative * F.relu(h[:, 0]), atol=1e-6
    )


def test_label_rule_closed_form():
    """dCE/dh_j = sum_c (softmax(z)_c - 1[c = y]) W2[c, j] * 1[h_j > 0]."""
    model, batch = _model(seed=5), _batch(seed=6)
    out = attribute_batch(model, batch, "grad_x_act_label")
    h = torch.as_tensor(out["probe"], dtype=torch.float64)
    w2, b2 = model.fc2.weight.detach().double(), model.fc2.bias.detach().double()
    p = (F.relu(h) @ w2.T + b2).softmax(dim=1)
    delta = p - F.one_hot(torch.as_tensor(batch["label"]), CLASSES).double()
    expected = ((delta @ w2) * F.relu(h)).abs()
    assert torch.allclose(torch.as_tensor(out["attribution"], dtype=torch.float64), expected, atol=1e-6)


def test_other_output_columns():
    model, batch = _model(), _batch()
    out = attribute_batch(model, batch, "grad_x_act_maxclass")
    x = torch.as_tensor(batch["x"])
    y = torch.as_tensor(batch["label"], dtype=torch.long)
    with torch.no_grad():
        h = model.probe(model.features(x))
        logits = model(x)
    prob = logits.softmax(dim=1)

    assert np.array_equal(out["sample_id"], batch["sample_id"]) and out["sample_id"].dtype == np.int64
    assert np.array_equal(out["label"], batch["label"])
    assert np.array_equal(out["is_corrupted"], batch["is_corrupted"])
    assert "true_label" not in out
    assert out["probe"].shape == (BATCH, PROBE)
    assert torch.allclose(torch.as_tensor(out["probe"]), h, atol=1e-6)
    for key in ("loss", "pred_label", "pred_prob", "given_prob"):
        assert out[key].shape == (BATCH,), key
    assert torch.allclose(torch.as_tensor(out["loss"]), F.cross_entropy(logits, y, reduction="none"), atol=1e-6)
    assert np.array_equal(out["pred_label"], logits.argmax(dim=1).numpy())
    assert torch.allclose(torch.as_tensor(out["pred_prob"]), prob.max(dim=1).values, atol=1e-6)
    assert torch.allclose(torch.as_tensor(out["given_prob"]), prob[torch.arange(BATCH), y], atol=1e-6)
    # the loss rule's single column is the same per-sample loss
    loss_rule = attribute_batch(model, batch, "loss")["attribution"]
    assert loss_rule.shape == (BATCH, 1)
    assert np.allclose(loss_rule[:, 0], out["loss"], atol=1e-6)


def test_last_layer_grad_layout():
    """[weight row-major (C x d) | bias]: the bias part is softmax - onehot, weight part its outer product
    with relu(h)."""
    model, batch = _model(), _batch()
    out = attribute_batch(model, batch, "last_layer_grad")
    h = torch.as_tensor(out["probe"], dtype=torch.float64)
    with torch.no_grad():
        p = model.head_from_probe(h.float()).softmax(dim=1).double()
    delta = p - F.one_hot(torch.as_tensor(batch["label"]), CLASSES).double()
    got = torch.as_tensor(out["attribution"], dtype=torch.float64)
    assert torch.allclose(got[:, CLASSES * PROBE :], delta, atol=1e-6)
    expected_w = (delta.unsqueeze(2) * F.relu(h).unsqueeze(1)).flatten(1)
    assert torch.allclose(got[:, : CLASSES * PROBE], expected_w, atol=1e-6)
