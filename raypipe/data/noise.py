"""Controlled corruption of a clean training set, with the ground truth kept beside it.

raypipe is measured on data whose corruption is known: the noise is injected here, seeded, and
`is_corrupted` records exactly which samples were touched so that the partition can be scored.
Label noise (symmetric, asymmetric class pairs) and the paper's input noise (Gaussian) are
supported; the exact counts (round(rate * N), per class for asymmetric) make runs comparable.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from raypipe.config import NoiseConfig
from raypipe.data.samples import SampleSet
from raypipe.errors import ConfigError

# Documented class-pair flips for `noise.kind=asymmetric, noise.pairs=dataset` (source -> dest).
ASYMMETRIC_PAIRS: dict[str, dict[int, int]] = {
    # The usual CIFAR-10 pairs: truck -> automobile, bird -> airplane, deer -> horse, cat <-> dog.
    "cifar10": {9: 1, 2: 0, 4: 7, 3: 5, 5: 3},
    # Digits that look alike: 2 -> 7, 3 -> 8, 5 <-> 6, 7 -> 1.
    "mnist": {2: 7, 3: 8, 5: 6, 6: 5, 7: 1},
    "digits": {2: 7, 3: 8, 5: 6, 6: 5, 7: 1},
    # Garments that look alike: T-shirt/top (0) -> shirt (6), pullover (2) -> coat (4),
    # sandal (5) -> sneaker (7), shirt (6) -> T-shirt/top (0), coat (4) -> pullover (2).
    "fashion-mnist": {0: 6, 2: 4, 5: 7, 6: 0, 4: 2},
}

GAUSSIAN_CHUNK_ROWS = 4096  # noise is drawn per chunk of rows to bound the temporary memory


def injected_noise(cfg: NoiseConfig, source: str) -> NoiseConfig:
    """The noise the data stage injects into `source`: `cfg` on a built-in data set, none into a user's own table
    (data.source=parquet) unless noise.apply_to=any asks for it."""
    if source == "parquet" and cfg.apply_to != "any":
        return dataclasses.replace(cfg, kind="none", rate=0.0)
    return cfg


def describe_noise(cfg: NoiseConfig) -> str:
    """One phrase for the console and the report: what was injected."""
    if cfg.kind == "none" or cfg.rate == 0:
        return "no noise injected"
    return f"{cfg.kind} noise {cfg.rate:g} injected" + (f" (sigma {cfg.sigma:g})" if cfg.kind == "gaussian" else "")


def check_pairs(cfg: NoiseConfig, source: str) -> None:
    """Asymmetric noise with the source's documented class pairs needs a source that has them."""
    if cfg.kind == "asymmetric" and cfg.pairs == "dataset" and source not in ASYMMETRIC_PAIRS:
        raise ConfigError(
            f"config key 'noise.pairs': source '{source}' has no documented class pairs; set noise.pairs=cyclic"
        )


def _pairs(cfg: NoiseConfig, source: str, num_classes: int) -> dict[int, int]:
    if cfg.pairs == "cyclic":
        return {c: (c + 1) % num_classes for c in range(num_classes)}
    check_pairs(cfg, source)
    pairs = ASYMMETRIC_PAIRS[source]
    if max(max(pairs), max(pairs.values())) >= num_classes:
        raise ConfigError(
            f"config key 'noise.pairs': the pairs of '{source}' need {max(max(pairs), max(pairs.values())) + 1} "
            f"classes, the data has {num_classes}; set noise.pairs=cyclic"
        )
    return pairs


def _choose(rng: np.random.Generator, candidates: np.ndarray, rate: float) -> np.ndarray:
    """Exactly round(rate * len(candidates)) of `candidates`, uniformly without replacement."""
    k = round(rate * len(candidates))
    return rng.choice(candidates, size=k, replace=False) if k else candidates[:0]


def apply_noise(samples: SampleSet, cfg: NoiseConfig, source: str) -> SampleSet:
    """A new SampleSet with `cfg.kind` noise at `cfg.rate`, deterministic by cfg.seed.

    `true_label` is kept; `is_corrupted` marks the flipped / noised samples (on top of any already marked).
    """
    if cfg.kind == "none" or len(samples) == 0:
        return samples
    rng = np.random.default_rng(cfg.seed)
    n, num_classes = len(samples), samples.num_classes
    label = samples.label.copy()
    x = samples.x
    corrupted = np.zeros(n, dtype=bool)

    if cfg.kind == "symmetric":
        chosen = _choose(rng, np.arange(n), cfg.rate)
        # An offset in 1..C-1 moves each chosen label to one of the other C-1 classes, uniformly.
        label[chosen] = (label[chosen] + rng.integers(1, num_classes, size=len(chosen))) % num_classes
        corrupted[chosen] = True
    elif cfg.kind == "asymmetric":
        original = samples.label  # flips read the original labels, so cat <-> dog never flips twice
        for src, dst in sorted(_pairs(cfg, source, num_classes).items()):
            chosen = _choose(rng, np.flatnonzero(original == src), cfg.rate)
            label[chosen] = dst
            corrupted[chosen] = True
    elif cfg.kind == "gaussian":
        # The paper's input noise: x <- clip(x + N(0, sigma^2), 0, 1) on the chosen samples.
        chosen = np.sort(_choose(rng, np.arange(n), cfg.rate))
        x = samples.x.copy()
        for start in range(0, len(chosen), GAUSSIAN_CHUNK_ROWS):
            rows = chosen[start : start + GAUSSIAN_CHUNK_ROWS]
            noise = rng.standard_normal((len(rows), *samples.sample_shape), dtype=np.float32)  # [k, *shape]
            x[rows] = np.clip(x[rows] + np.float32(cfg.sigma) * noise, 0.0, 1.0)
        corrupted[chosen] = True
    else:
        raise ConfigError(f"config key 'noise.kind': unknown kind '{cfg.kind}'")

    return dataclasses.replace(samples, x=x, label=label, is_corrupted=samples.is_corrupted | corrupted)
