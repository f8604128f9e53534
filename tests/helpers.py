"""Small test-only conveniences over the product's own pieces (never imported by raypipe)."""

from __future__ import annotations

import numpy as np
import torch

from raypipe.config import TrainConfig
from raypipe.training.loop import Callback, InMemory, LoopState, fit, prepare


def train_arrays(
    model: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    cfg: TrainConfig,
    route: str,
    device: torch.device | str = "cpu",
    seed: int = 0,
    callbacks: list[Callback] = (),
) -> LoopState:
    """The product's loop on in-memory arrays: `prepare` (what trains, the optimizer, l_ft's cached
    features) then `fit`, as `raypipe.stages.train.train_route` does without its files."""
    device = torch.device(device)
    data = InMemory.from_arrays(x, y, np.arange(len(y)), cfg.batch_size, seed)
    trainee, optimizer, data = prepare(model, route, cfg, data, device)
    return fit(trainee, optimizer, data, cfg.epochs, route, device, callbacks=list(callbacks))
