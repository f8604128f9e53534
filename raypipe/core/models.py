"""Models: a backbone, then the RLAP head ``fc: Linear(F, d) -> ReLU -> fc2: Linear(d, C)``.

The hidden head layer is the *probe layer*: every neuron statistic and all pruning happen there.
``h = fc(features) * probe_mask`` is its pre-ReLU output. Pruning sets ``probe_mask[j] = 0``; the
mask is a buffer, not a parameter, so no optimizer can revive a pruned neuron (the published code
zeroed weights, which regrow during fine-tuning).

The user-model contract (``model.name=user``, ``model.factory=pkg.module:fn``): ``fn(input_shape,
num_classes, probe_width)`` returns a ``ProbedModel``; any backbone mapping ``[B, *input_shape]`` to
``[B, F]`` works, the head is always this module's.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raypipe.config import ModelConfig
from raypipe.errors import CheckpointError, ConfigError

CHECKPOINT_FORMAT = 1


class ProbedModel(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, probe_width: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(feature_dim, probe_width)  # the probe layer
        self.fc2 = nn.Linear(probe_width, num_classes)
        self.register_buffer("probe_mask", torch.ones(probe_width))

    @property
    def probe_width(self) -> int:
        return self.fc.out_features

    @property
    def num_classes(self) -> int:
        return self.fc2.out_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, *input_shape] -> [B, F], the probe layer's input."""
        return self.backbone(x)

    def probe(self, features: torch.Tensor) -> torch.Tensor:
        """[B, F] -> h, [B, d] pre-ReLU, pruned neurons exactly 0."""
        return self.fc(features) * self.probe_mask

    def head_from_probe(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, d] -> logits [B, C]."""
        return self.fc2(F.relu(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_from_probe(self.probe(self.features(x)))

    def head_parameters(self) -> list[nn.Parameter]:
        return [*self.fc.parameters(), *self.fc2.parameters()]


class _Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def _mlp(input_shape: tuple[int, ...], hidden_width: int) -> tuple[nn.Module, int]:
    n_in = 1
    for s in input_shape:
        n_in *= s
    return nn.Sequential(_Flatten(), nn.Linear(n_in, hidden_width), nn.ReLU()), hidden_width


def _cnn_small(input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    if len(input_shape) != 3:
        raise ConfigError(
            f"model 'cnn_small' needs image inputs (C, H, W), got shape {input_shape}; use model.name=mlp"
        )
    channels = input_shape[0]
    # [B, C, H, W] -> [B, 64, 4, 4] for 28x28, 32x32 (and 8x8) inputs alike, then flat 1024.
    backbone = nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(4),
        _Flatten(),
    )
    return backbone, 64 * 4 * 4


def _resnet18_cifar(input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    if len(input_shape) != 3:
        raise ConfigError(f"model 'resnet18_cifar' needs image inputs (C, H, W), got shape {input_shape}")
    import torchvision  # imported here: seconds of start-up that other models never need

    # The paper's CIFAR stem: 3x3 conv, stride 1, no max-pool; the classifier is our head.
    net = torchvision.models.resnet18(weights=None)
    net.conv1 = nn.Conv2d(input_shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net, 512


def _load_factory(spec: str) -> Any:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"config key 'model.factory': '{spec}' is not 'package.module:callable'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"config key 'model.factory': cannot load '{spec}': {e}") from None


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> ProbedModel:
    input_shape = tuple(int(s) for s in input_shape)
    if cfg.name == "user":
        model = _load_factory(cfg.factory)(input_shape, num_classes, cfg.probe_width)
        if not isinstance(model, ProbedModel):
            raise ConfigError(f"model.factory '{cfg.factory}' returned {type(model).__name__}, not a ProbedModel")
        return model
    if cfg.name == "mlp":
        backbone, feature_dim = _mlp(input_shape, cfg.hidden_width)
    elif cfg.name == "cnn_small":
        backbone, feature_dim = _cnn_small(input_shape)
    elif cfg.name == "resnet18_cifar":
        backbone, feature_dim = _resnet18_cifar(input_shape)
    else:
        raise ConfigError(f"config key 'model.name': unknown model '{cfg.name}'")
    return ProbedModel(backbone, feature_dim, cfg.probe_width, num_classes)


# ---------------------------------------------------------------------------------------------
# Checkpoints: a state dict plus the architecture that produced it, loaded with weights_only=True
# (a checkpoint can never run code), and checked against the configured model before use.


def model_signature(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "name": cfg.name,
        "factory": cfg.factory,
        "hidden_width": cfg.hidden_width,
        "probe_width": cfg.probe_width,
        "input_shape": [int(s) for s in input_shape],
        "num_classes": int(num_classes),
    }


def checkpoint_dict(model: ProbedModel, signature: dict[str, Any], extra: dict[str, Any] | None = None) -> dict:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"signature": signature, "model_state": state, "extra": extra or {}}


SIGNATURE_KEYS = ("name", "probe_width", "input_shape", "num_classes", "hidden_width")


def saved_signature(blob: Any, source: str) -> dict[str, Any]:
    if not isinstance(blob, dict) or "model_state" not in blob or "signature" not in blob:
        raise CheckpointError(f"checkpoint '{source}' is not a raypipe checkpoint (no signature / model_state)")
    saved = blob["signature"]
    if not isinstance(saved, dict) or any(key not in saved for key in SIGNATURE_KEYS):
        raise CheckpointError(f"checkpoint '{source}' is not a raypipe checkpoint (malformed signature)")
    return saved


def check_signature(saved: dict[str, Any], signature: dict[str, Any], source: str) -> None:
    for key in SIGNATURE_KEYS:
        if saved.get(key) != signature.get(key):
            fix = (
                f"set model.{key} to match"
                if key in ("name", "probe_width", "hidden_width")
                # the data decides these: a checkpoint of another data set cannot be repaired on this one
                else "use data with the checkpoint's sample shape and classes (data.source / data.path)"
            )
            raise CheckpointError(
                f"checkpoint '{source}' has {key}={saved.get(key)!r} but the config asks for {signature.get(key)!r}; "
                f"{fix} or use another checkpoint"
            )


def load_checkpoint_dict(blob: dict, model: ProbedModel, signature: dict[str, Any], source: str) -> dict[str, Any]:
    """Load `blob` (from torch.load(weights_only=True)) into `model`; return its `extra`."""
    check_signature(saved_signature(blob, source), signature, source)
    try:
        model.load_state_dict(blob["model_state"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint '{source}' does not fit the model: {str(e).splitlines()[0]}") from None
    return blob.get("extra", {})
