"""Persistent pruning of probe neurons. Plain torch, no Ray.

A pruned neuron's mask entry is 0: its pre-activation is multiplied by 0 in every forward pass, so
its output and every gradient through it are exactly 0 and no optimizer step, weight decay or
momentum can bring it back (the published code zeroed weights, which regrow during F-FT). The
neuron's incoming and outgoing weights are zeroed too, so a checkpoint reads as pruned.
"""

from __future__ import annotations

import numpy as np
import torch

from raypipe.core.models import ProbedModel
from raypipe.errors import ConfigError


def prune_count(fraction: float, probe_width: int) -> int:
    """How many of `probe_width` probe neurons `prune.fraction` prunes (rounded to the nearest)."""
    return int(round(fraction * probe_width))


def check_prune_fraction(fraction: float, probe_width: int, key: str = "prune.fraction") -> None:
    """A fraction that prunes every probe neuron leaves a model that predicts one class: refused."""
    if prune_count(fraction, probe_width) < probe_width:
        return
    largest = (probe_width - 1) / probe_width
    while prune_count(largest, probe_width) >= probe_width:
        largest -= 0.001
    raise ConfigError(
        f"config key '{key}': {fraction} prunes all {probe_width} probe neurons (model.probe_width), which leaves a "
        f"model that predicts one class; use at most {np.floor(largest * 1000) / 1000:g}"
    )


@torch.no_grad()
def prune_neurons(model: ProbedModel, neurons: np.ndarray) -> None:
    index = torch.as_tensor(np.asarray(neurons, dtype=np.int64), device=model.probe_mask.device)
    model.probe_mask[index] = 0.0
    model.fc.weight[index] = 0.0
    model.fc.bias[index] = 0.0
    model.fc2.weight[:, index] = 0.0


def pruned_mask(model: ProbedModel) -> np.ndarray:
    """[d] bool, True where the neuron is pruned."""
    return (model.probe_mask == 0).cpu().numpy()
