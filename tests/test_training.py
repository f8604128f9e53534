"""The training loop: what each route trains, timing, metrics, and that it learns at all."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, precision_score
from torch import nn

from raypipe.config import ModelConfig, TrainConfig
from raypipe.core.metrics import classification_metrics
from raypipe.core.models import ProbedModel, build_model
from raypipe.training.loop import Callback, InMemory, evaluate, per_rank_batch, predict_logits, train_arrays

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE, CLASSES = (1, 4, 4), 4
CPU = torch.device("cpu")
ADAM = TrainConfig(epochs=2, optimizer="adam", lr=1e-2, batch_size=16)


def _blobs(n: int, seed: int, spread: float = 0.5):
    """CLASSES well separated blobs in (1, 4, 4) input space."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(scale=2.0, size=(CLASSES, *SHAPE))
    y = rng.integers(0, CLASSES, size=n)
    x = centres[y] + rng.normal(scale=spread, size=(n, *SHAPE))
    return x.astype(np.float32), y


def _bn_model(seed: int = 0) -> ProbedModel:
    """A backbone with BatchNorm, so running statistics (buffers) are covered too."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.BatchNorm1d(12), nn.ReLU())
    return ProbedModel(backbone, 12, probe_width=8, num_classes=CLASSES)


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_l_ft_trains_only_the_head():
    x, y = _blobs(96, seed=0)
    model = _bn_model()
    backbone0, head0 = _snapshot(model.backbone), {k: v.clone() for k, v in model.named_parameters()}
    train_arrays(model, x, y, ADAM, route="l_ft", device=CPU)
    for k, v in model.backbone.state_dict().items():  # parameters and BatchNorm running statistics
        assert torch.equal(v, backbone0[k]), k
    for name in ("fc.weight", "fc.bias", "fc2.weight", "fc2.bias"):
        assert not torch.equal(dict(model.named_parameters())[name], head0[name]), name


def test_l_ft_on_cached_features_equals_l_ft_through_the_backbone(monkeypatch):
    """l_ft trains the head on backbone features computed once (eval mode): the same arithmetic as a
    backbone forward pass per epoch, so the same head, loss and accuracy come out."""
    import raypipe.training.loop as training

    x, y = _blobs(96, seed=1)
    cached, direct = _bn_model(seed=3), _bn_model(seed=3)
    cfg = TrainConfig(epochs=3, optimizer="adam", lr=1e-2, batch_size=16)
    calls = {"cached": 0, "direct": 0}
    cached.backbone.register_forward_hook(lambda *_: calls.__setitem__("cached", calls["cached"] + 1))
    direct.backbone.register_forward_hook(lambda *_: calls.__setitem__("direct", calls["direct"] + 1))
    result_cached = train_arrays(cached, x, y, cfg, route="l_ft", device=CPU, seed=5)
    monkeypatch.setattr(training, "FEATURE_CACHE_MAX_BYTES", 0)  # too small: the backbone runs every epoch
    result_direct = train_arrays(direct, x, y, cfg, route="l_ft", device=CPU, seed=5)
    assert calls == {"cached": 1, "direct": 3 * 6}  # one pass over 96 samples, against 6 batches x 3 epochs
    for (name, a), b in zip(cached.state_dict().items(), direct.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name
    for h_cached, h_direct in zip(result_cached.history, result_direct.history, strict=True):
        assert h_cached["train_loss"] == pytest.approx(h_direct["train_loss"], abs=1e-5)
        assert h_cached["train_accuracy"] == h_direct["train_accuracy"]
    assert result_cached.seconds_train > 0


def test_f_ft_trains_the_backbone():
    x, y = _blobs(96, seed=0)
    model = _bn_model()
    train_arrays(model, x, y, ADAM, route="l_ft", device=CPU)  # a frozen backbone must thaw for f_ft
    backbone0 = _snapshot(model.backbone)
    fc0 = model.fc.weight.detach().clone()
    train_arrays(model, x, y, ADAM, route="f_ft", device=CPU)
    assert not torch.equal(model.backbone.state_dict()["1.weight"], backbone0["1.weight"])
    assert not torch.equal(model.backbone.state_dict()["2.running_mean"], backbone0["2.running_mean"])
    assert not torch.equal(model.fc.weight, fc0)
    assert all(p.requires_grad for p in model.parameters())


class _Seen(Callback):
    def __init__(self):
        self.seen = []

    def on_epoch_end(self, epoch, metrics, state):
        self.seen.append((epoch, state, metrics))


def test_fit_result_and_callback():
    x, y = _blobs(50, seed=1)
    model = build_model(ModelConfig(name="mlp", probe_width=8, hidden_width=8), SHAPE, CLASSES)
    callback = _Seen()
    cfg = TrainConfig(epochs=3, lr=1e-2, batch_size=16)
    result = train_arrays(model, x, y, cfg, "initial", CPU, callbacks=[callback])
    seen = callback.seen
    assert result.epoch == 3 and len(result.history) == 3
    assert result.seconds_train > 0
    assert result.seconds_train == pytest.approx(sum(h["seconds"] for h in result.history))
    assert result.seconds_per_epoch == pytest.approx(result.seconds_train / 3)
    assert [e for e, _, _ in seen] == [1, 2, 3] and all(s is result for _, s, _ in seen)
    assert [m for _, _, m in seen] == result.history  # callbacks see the metrics the history keeps
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert all(h["n"] == 50 for h in result.history)  # every sample once per epoch (last batch partial)
    assert all(0.0 <= h["train_accuracy"] <= 1.0 and h["train_loss"] > 0 for h in result.history)


def test_batches_cover_every_sample_once():
    x = torch.arange(10).float().unsqueeze(1)
    y = torch.arange(10)
    data = InMemory(x, y, np.arange(10), batch_size=4, seed=0)
    batches = list(data.batches(0))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    got = torch.cat([b[1] for b in batches])
    assert sorted(got.tolist()) == list(range(10)) and got.tolist() != list(range(10))
    assert all(torch.equal(bx[:, 0].long(), by) for bx, by in batches)  # x and y stay paired
    # The order depends on (seed, epoch) only: a resumed run sees the batches an uninterrupted one saw.
    assert torch.equal(torch.cat([b[1] for b in data.batches(1)]), torch.cat([b[1] for b in data.batches(1)]))
    assert not torch.equal(torch.cat([b[1] for b in data.batches(1)]), got)


def test_ranks_split_one_permutation_into_equal_parts():
    """Data-parallel ranks take strides of the epoch's one permutation: together every sample, each the
    same number of batches (padded by wrapping), and the 1-rank order is their interleaving."""
    x, y = torch.arange(10).float().unsqueeze(1), torch.arange(10)
    whole = torch.cat([b[1] for b in InMemory(x, y, np.arange(10), 2, seed=3).batches(4)])
    parts = [
        torch.cat([b[1] for b in InMemory(x, y, np.arange(10), 2, 3, rank=r, world=3).batches(4)]) for r in range(3)
    ]
    assert [len(p) for p in parts] == [4, 4, 4]
    assert set(torch.cat(parts).tolist()) == set(range(10))
    assert torch.stack(parts, dim=1).reshape(-1)[:10].tolist() == whole.tolist()


def test_ranks_batches_together_are_the_one_process_batches():
    """With batch_size / world per rank, batch k of the ranks together is batch k of one process (the
    last one plus the wrap padding), so DDP's mean of the ranks' gradients is one process's gradient."""
    n, batch, world = 21, 8, 2
    x, y = torch.randn(n, 3), torch.arange(n)
    one = [b for b in InMemory(x, y, np.arange(n), batch, seed=3).batches(2)]
    b = per_rank_batch(batch, world)
    ranks = [list(InMemory(x, y, np.arange(n), b, 3, rank=r, world=world).batches(2)) for r in range(world)]
    assert b == 4 and len(ranks[0]) == len(ranks[1]) == len(one) == 3
    for k in range(2):  # full batches: the same samples
        assert sorted(torch.cat([ranks[0][k][1], ranks[1][k][1]]).tolist()) == sorted(one[k][1].tolist())
    last = torch.cat([ranks[0][2][1], ranks[1][2][1]]).tolist()
    assert set(one[2][1].tolist()) < set(last) and len(last) == len(one[2][1]) + 1  # + one wrapped-around sample
    # The mean of the ranks' mean-loss gradients on a full batch = the one-process gradient.
    w = torch.randn(3, requires_grad=True)

    def grad(xb, yb):
        (g,) = torch.autograd.grad(((xb @ w - yb.float()) ** 2).mean(), w)
        return g

    mean_of_ranks = (grad(*ranks[0][0]) + grad(*ranks[1][0])) / 2
    assert torch.allclose(mean_of_ranks, grad(*one[0]), atol=1e-5)
    assert per_rank_batch(128, 3) == 43 and per_rank_batch(1, 4) == 1  # rounded up, never 0


def test_classification_metrics_hand_computed():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 0])
    m = classification_metrics(y_true, y_pred)
    # precision per class: 1/2, 2/3, 1/1; recall 1/2, 1, 1/2; F1 1/2, 4/5, 2/3
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["macro_precision"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert m["macro_f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert m["macro_precision"] == pytest.approx(precision_score(y_true, y_pred, average="macro"))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))


def test_evaluate_on_hand_made_logits():
    """An identity 'model' whose logits are given: evaluate = metrics of their argmax."""
    y_true = np.array([0, 0, 1, 1, 2, 2, 3])
    y_pred = np.array([0, 1, 1, 1, 2, 0, 1])  # class 3 never predicted: precision counts it as 0
    logits = np.eye(4, dtype=np.float32)[y_pred] * 3.0 - 1.0
    m = evaluate(nn.Identity(), logits, y_true, CPU, batch_size=3)
    assert m == pytest.approx(classification_metrics(y_true, y_pred))
    assert m["accuracy"] == pytest.approx(4 / 7)
    assert m["macro_precision"] == pytest.approx(precision_score(y_true, y_pred, average="macro", zero_division=0))
    assert m["macro_precision"] == pytest.approx((1 / 2 + 2 / 4 + 1 + 0) / 4)
    assert np.array_equal(predict_logits(nn.Identity(), logits, 2, CPU), logits)


def test_learns_a_separable_problem():
    x, y = _blobs(400, seed=2)
    x_test, y_test = _blobs(200, seed=3)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp", probe_width=16, hidden_width=32), SHAPE, CLASSES)
    before = evaluate(model, x_test, y_test, CPU)["accuracy"]
    train_arrays(model, x, y, TrainConfig(epochs=5, optimizer="adam", lr=1e-2, batch_size=32), "initial", CPU)
    after = evaluate(model, x_test, y_test, CPU)
    assert after["accuracy"] > 0.9 and after["macro_f1"] > 0.9
    assert after["accuracy"] > before
