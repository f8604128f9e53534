"""Model builders, the user-factory contract, and checkpoints that refuse the wrong model or unsafe pickles."""

from __future__ import annotations

import os
import pickle
import uuid
from pathlib import Path

import pytest
import torch

from raypipe import storage
from raypipe.config import ModelConfig
from raypipe.core.models import ProbedModel, build_model, model_signature
from raypipe.errors import CheckpointError, ConfigError
from raypipe.training.checkpoint import load_model, save_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _check_shapes(model: ProbedModel, shape: tuple[int, ...], probe: int, classes: int) -> None:
    model.eval()
    x = torch.randn(2, *shape)
    with torch.no_grad():
        h = model.probe(model.features(x))
        logits = model(x)
    assert h.shape == (2, probe)
    assert logits.shape == (2, classes)
    assert model.probe_width == probe and model.num_classes == classes
    assert model.probe_mask.shape == (probe,) and bool(model.probe_mask.eq(1).all())
    assert torch.allclose(model.head_from_probe(h), logits)


@pytest.mark.parametrize("shape", [(1, 4, 4), (3, 8, 8), (20,)])
def test_mlp(shape):
    model = build_model(ModelConfig(name="mlp", probe_width=6, hidden_width=10), shape, 3)
    _check_shapes(model, shape, 6, 3)
    assert model.fc.in_features == 10


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8)])
def test_cnn_small(shape):
    model = build_model(ModelConfig(name="cnn_small", probe_width=12), shape, 10)
    _check_shapes(model, shape, 12, 10)
    assert model.fc.in_features == 1024


def test_cnn_small_needs_images():
    with pytest.raises(ConfigError, match="image"):
        build_model(ModelConfig(name="cnn_small"), (64,), 10)


def test_resnet18_cifar():
    model = build_model(ModelConfig(name="resnet18_cifar", probe_width=16), (3, 32, 32), 10)
    _check_shapes(model, (3, 32, 32), 16, 10)
    assert model.fc.in_features == 512
    assert model.backbone.conv1.stride == (1, 1) and isinstance(model.backbone.maxpool, torch.nn.Identity)


def test_head_parameters_are_fc_and_fc2():
    model = build_model(ModelConfig(name="mlp", probe_width=4, hidden_width=5), (3,), 2)
    assert {id(p) for p in model.head_parameters()} == {
        id(p) for p in [*model.fc.parameters(), *model.fc2.parameters()]
    }
    assert "probe_mask" not in dict(model.named_parameters())  # a buffer: no optimizer can touch it
    assert "probe_mask" in model.state_dict()


FACTORY_SOURCE = """
import torch
from raypipe.core.models import ProbedModel

CALLS = []


def make(input_shape, num_classes, probe_width):
    CALLS.append((input_shape, num_classes, probe_width))
    n = 1
    for s in input_shape:
        n *= s
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(n, 7))
    return ProbedModel(backbone, 7, probe_width, num_classes)


def not_a_model(input_shape, num_classes, probe_width):
    return torch.nn.Linear(3, 3)
"""


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    name = f"user_factory_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_user_factory(factory_module):
    cfg = ModelConfig(name="user", probe_width=5, factory=f"{factory_module}:make")
    model = build_model(cfg, [2, 3, 3], 4)  # a list shape is normalized to a tuple of ints
    _check_shapes(model, (2, 3, 3), 5, 4)
    import importlib

    assert importlib.import_module(factory_module).CALLS == [((2, 3, 3), 4, 5)]


def test_user_factory_checkpoint_round_trip(factory_module, tmp_path):
    cfg = ModelConfig(name="user", probe_width=5, factory=f"{factory_module}:make")
    model = build_model(cfg, (2, 3, 3), 4)
    signature = model_signature(cfg, (2, 3, 3), 4)
    save_model(str(tmp_path / "user.pt"), model, signature)
    loaded, _, _ = load_model(str(tmp_path / "user.pt"), expect=signature)
    x = torch.randn(3, 2, 3, 3)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize(
    "spec",
    ["no_colon_here", ":make", "module_only:", "raypipe_no_such_module_xyz:make", "os.path:no_such_callable"],
)
def test_bad_factory_string(spec):
    with pytest.raises(ConfigError, match="model.factory"):
        build_model(ModelConfig(name="user", factory=spec), (4,), 2)


def test_factory_returning_something_else(factory_module):
    with pytest.raises(ConfigError, match="not a ProbedModel"):
        build_model(ModelConfig(name="user", factory=f"{factory_module}:not_a_model"), (4,), 2)


def test_unknown_model_name():
    with pytest.raises(ConfigError, match="model.name"):
        build_model(ModelConfig(name="nope"), (4,), 2)


# --------------------------------------------------------------------------------------------- checkpoints

MLP = ModelConfig(name="mlp", probe_width=8, hidden_width=12)
SHAPE = (1, 4, 4)


def _saved(tmp_path) -> tuple[str, ProbedModel, dict]:
    torch.manual_seed(0)
    model = build_model(MLP, SHAPE, 3)
    signature = model_signature(MLP, SHAPE, 3)
    uri = str(tmp_path / "model.pt")
    save_model(uri, model, signature, {"epoch": 4})
    return uri, model, signature


def test_checkpoint_round_trip(tmp_path):
    uri, model, signature = _saved(tmp_path)
    loaded, saved, extra = load_model(uri)
    assert saved == signature and extra == {"epoch": 4}
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


@pytest.mark.parametrize(
    "other,named",
    [
        (ModelConfig(name="mlp", probe_width=16, hidden_width=12), "probe_width"),
        (ModelConfig(name="cnn_small", probe_width=8, hidden_width=12), "name"),
        (ModelConfig(name="mlp", probe_width=8, hidden_width=20), "hidden_width"),
    ],
)
def test_load_refuses_another_architecture(tmp_path, other, named):
    uri, _, _ = _saved(tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_model(uri, expect=model_signature(other, SHAPE, 3))
    assert named in str(info.value)
    assert f"model.{named}" in str(info.value)  # says which setting to change


def test_load_refuses_other_shape_or_classes(tmp_path):
    uri, _, _ = _saved(tmp_path)
    with pytest.raises(CheckpointError, match="num_classes"):
        load_model(uri, expect=model_signature(MLP, SHAPE, 10))
    with pytest.raises(CheckpointError, match="input_shape"):
        load_model(uri, expect=model_signature(MLP, (1, 8, 8), 3))


def test_non_raypipe_and_corrupt_checkpoints(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(3)}, plain)
    with pytest.raises(CheckpointError, match="not a raypipe checkpoint"):
        load_model(str(plain))
    bare = tmp_path / "bare.pt"
    torch.save(torch.zeros(3), bare)
    with pytest.raises(CheckpointError, match="not a raypipe checkpoint"):
        load_model(str(bare))

    uri, _, _ = _saved(tmp_path)
    data = Path(uri).read_bytes()
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        load_model(str(corrupt))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(256))
    with pytest.raises(CheckpointError):
        load_model(str(garbage))


def test_malformed_signature_is_a_checkpoint_error(tmp_path):
    for i, signature in enumerate([{}, {"name": "mlp"}, ["mlp"], {**model_signature(MLP, SHAPE, 3), "name": "nope"}]):
        path = tmp_path / f"bad{i}.pt"
        torch.save({"signature": signature, "model_state": {}, "extra": {}}, path)
        with pytest.raises(CheckpointError):
            load_model(str(path))


def test_state_that_does_not_fit(tmp_path):
    uri, model, signature = _saved(tmp_path)
    blob = torch.load(uri, weights_only=True)
    blob["model_state"]["fc.weight"] = torch.zeros(8, 99)
    torch.save(blob, tmp_path / "misfit.pt")
    with pytest.raises(CheckpointError, match="does not fit"):
        load_model(str(tmp_path / "misfit.pt"), expect=signature)


def test_checkpoint_never_calls_a_factory_it_names(tmp_path, factory_module):
    """With `expect`, a checkpoint claiming a user factory of another model is refused before any code in
    it is imported or called."""
    cfg = ModelConfig(name="user", probe_width=5, factory=f"{factory_module}:make")
    model = build_model(cfg, (4,), 2)
    import importlib

    calls = importlib.import_module(factory_module).CALLS
    calls.clear()
    uri = str(tmp_path / "user.pt")
    save_model(uri, model, model_signature(cfg, (4,), 2))
    with pytest.raises(CheckpointError, match="name"):
        load_model(uri, expect=model_signature(MLP, (4,), 2))
    assert calls == []


class _Custom:
    def __init__(self):
        self.value = 3


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_load_torch_refuses_pickled_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"signature": {"name": "mlp"}, "model_state": {"w": _Evil(str(marker))}}, evil)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        storage.load_torch(str(evil))
    with pytest.raises(CheckpointError):
        load_model(str(evil))
    assert not marker.exists()

    custom = tmp_path / "custom.pt"
    torch.save({"model_state": {}, "signature": {}, "extra": _Custom()}, custom)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        storage.load_torch(str(custom))
    assert not marker.exists()

    # the control: the same payload under a plain unpickler does run (so the checks above mean something)
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Evil(str(control))))
    assert control.exists()


def test_load_torch_missing_file(tmp_path):
    from raypipe.errors import RaypipeError

    with pytest.raises(RaypipeError, match="does not exist"):
        storage.load_torch(str(tmp_path / "nope.pt"))
