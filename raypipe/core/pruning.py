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
