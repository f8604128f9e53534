"""Helpers shared by the detection modules."""

from __future__ import annotations

import numpy as np


def _rng(seed: int, purpose: str) -> np.random.Generator:
    """A generator for one purpose, independent of every other `default_rng(seed)` stream: a row sample drawn
    here never coincides with, say, the noise injection's draws of the same seed (docs/detection.md)."""
    return np.random.default_rng([seed, int.from_bytes(purpose.encode(), "little") % (2**63)])
