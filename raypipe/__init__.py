"""raypipe: repair a model trained on noisy data (RLAP) on Ray.

Public names:

- ``raypipe.run(config, out)``: run (or resume) the pipeline under ``out``, return the report;
- ``raypipe.run_sweep(config, out)``: a Ray Tune sweep over the repair's settings;
- ``raypipe.find_label_issues(config, out, model=None)``: detection alone -> the label issues (a DataFrame);
- ``raypipe.load_model(out)``: the repaired model of a finished run (a ``torch.nn.Module``);
- ``raypipe.load_config(path, overrides)`` / ``raypipe.load_sweep_config(...)``: a validated ``Config``;
- ``raypipe.Config``: every setting, one frozen dataclass per stage.

The public API is imported lazily, so ``import raypipe.core.models`` (as a Ray worker does) does not
pay for the pipeline, the executors or Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "run": "raypipe.api",
    "run_sweep": "raypipe.api",
    "load_model": "raypipe.api",
    "find_label_issues": "raypipe.api",
    "Config": "raypipe.config",
    "load_config": "raypipe.config",
    "load_sweep_config": "raypipe.sweep",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'raypipe' has no attribute {name!r}")
