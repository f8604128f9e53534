"""raypipe: repair a model trained on noisy data (RLAP) on Ray."""

from raypipe.api import run
from raypipe.config import Config, load_config

__all__ = ["Config", "load_config", "run"]
__version__ = "0.1.0"
