"""`load_splits`: any configured source -> clean, validated train / val / test SampleSets.

Every source ends in the same checked form, so no later stage has to know where data came from.
Splits are seeded by `data.split_seed` and each split keeps the source's canonical order, so the
same config always gives the same samples under the same ids. Sources with an official test set
(mnist, fashion-mnist, cifar10) keep it as the test split; the others get a stratified one.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from raypipe.config import DataConfig
from raypipe.data import cifar, idx
from raypipe.data.parquet_source import parquet_files, read_parquet_source
from raypipe.data.samples import SampleSet, validate_samples
from raypipe.errors import ConfigError, DataError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
IMAGE_CLASSES = 10  # every built-in image source


def _cache_dir(source: str) -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "raypipe" / source


def _default_roots(source: str) -> list[Path]:
    """Where a source's files are looked for when data.path is unset; a download goes to the last."""
    if source == "fashion-mnist":
        return [DEBIAN_FASHION_MNIST, _cache_dir(source)]
    return [_cache_dir(source)]


def _download(source: str, root: Path) -> None:
    try:
        import torchvision.datasets as tvd
    except ImportError:
        raise DataError(f"{source}: data.download=true needs torchvision; pip install torchvision") from None
    dataset_cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[source]
    try:
        root.mkdir(parents=True, exist_ok=True)
        dataset_cls(root=str(root), train=True, download=True)  # fetches the train and the test files
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(
            f"{source}: download into '{root}' failed ({first}); fetch the files by hand and set data.path"
        ) from None


def _locate(cfg: DataConfig, complete: Callable[[Path], bool]) -> Path:
    """The directory holding the source's files (`complete(dir)` says if it does), downloading if asked.

    Returns the first candidate when nothing is found, so the reader can name the missing file.
    """
    roots = [Path(cfg.path).expanduser()] if cfg.path is not None else _default_roots(cfg.source)
    for root in roots:
        if complete(root):
            return root
    if cfg.download:
        _download(cfg.source, roots[-1])
        return roots[-1]
    return roots[0]


def input_files(cfg: DataConfig) -> list[str]:
    """The files `load_splits` reads for `cfg` as they are now (none are fetched): what the data stage's
    fingerprint covers, so that data changed at the same path is never taken for the data of a finished run."""
    if cfg.source == "digits":
        return [str(files("sklearn.datasets.data") / "digits.csv.gz")]
    if cfg.source == "parquet":
        paths = [p for p in (cfg.path, cfg.test_path) if p is not None]
        return [f for p in paths for f in parquet_files(p)]
    roots = [Path(cfg.path).expanduser()] if cfg.path is not None else _default_roots(cfg.source)
    if cfg.source == "cifar10":
        found = [cifar.cifar10_files(root) for root in roots]
    else:
        found = [idx.idx_files(root, cfg.source) for root in roots if not idx.missing_idx_files(root, cfg.source)]
    return [str(path) for path in next((f for f in found if f), [])]


# ---------------------------------------------------------------------------------------------
# Loaders: each returns (the pool to carve train/val from, the official test set or None, where).


def _load_digits() -> tuple[SampleSet, None, str]:
    digits = load_digits()
    x = (digits.images.astype(np.float32) / np.float32(16.0))[:, None, :, :]  # [1797, 1, 8, 8], 0..16 -> [0, 1]
    n = len(x)
    return SampleSet.clean(np.arange(n), x, digits.target, IMAGE_CLASSES), None, "digits (sklearn load_digits)"


def _with_official_test(
    train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], where: str
) -> tuple[SampleSet, SampleSet, str]:
    """Train ids 0..n_train-1, test ids offset by n_train: positions in train-then-test order."""
    (x_train, y_train), (x_test, y_test) = train, test
    n_train, n_test = len(x_train), len(x_test)
    pool = SampleSet.clean(np.arange(n_train), x_train, y_train, IMAGE_CLASSES)
    official = SampleSet.clean(n_train + np.arange(n_test), x_test, y_test, IMAGE_CLASSES)
    return pool, official, where


def _load_idx(cfg: DataConfig) -> tuple[SampleSet, SampleSet, str]:
    root = _locate(cfg, lambda r: not idx.missing_idx_files(r, cfg.source))
    missing = idx.missing_idx_files(root, cfg.source)
    if missing:
        hint = "install the Debian package dataset-fashion-mnist, or " if cfg.source == "fashion-mnist" else ""
        raise DataError(
            f"{cfg.source}: file '{missing[0]}[.gz]' is missing in '{root}'; pass data.download=true, "
            f"or {hint}point data.path at the directory holding it"
        )
    train = idx.read_idx_split(root, cfg.source, "train")
    test = idx.read_idx_split(root, cfg.source, "test")
    return _with_official_test(train, test, f"{cfg.source} data in '{root}'")


def _load_cifar10(cfg: DataConfig) -> tuple[SampleSet, SampleSet, str]:
    root = _locate(cfg, cifar.has_cifar10)
    splits = cifar.read_cifar10(root)  # names the missing files when there is no complete layout
    return _with_official_test(splits["train"], splits["test"], f"cifar10 data in '{root}'")


# ---------------------------------------------------------------------------------------------
# Splitting.


def _carve(labels: np.ndarray, n_take: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept positions, taken positions), both sorted; stratified by label where the counts allow."""
    everything = np.arange(len(labels))
    if n_take == 0:
        return everything, everything[:0]
    try:
        kept, taken = train_test_split(everything, test_size=n_take, stratify=labels, random_state=seed)
    except ValueError:  # a class with a single sample, or fewer taken than classes: plain uniform split
        kept, taken = train_test_split(everything, test_size=n_take, random_state=seed)
    return np.sort(kept), np.sort(taken)


def _count(fraction: float, n: int) -> int:
    """round(fraction * n), but at least one sample for a non-zero fraction."""
    return max(1, round(fraction * n)) if fraction > 0 else 0


def _split(pool: SampleSet, test: SampleSet | None, cfg: DataConfig, where: str) -> dict[str, SampleSet]:
    n = len(pool)
    n_test = _count(cfg.test_fraction, n) if test is None else 0
    n_val = _count(cfg.val_fraction, n)
    if n - n_test - n_val < 1:
        raise DataError(
            f"{where} has only {n} samples, too few for val/test fractions {cfg.val_fraction}/{cfg.test_fraction}; "
            "add data or lower data.val_fraction / data.test_fraction"
        )
    if test is None:
        rest, test_pos = _carve(pool.label, n_test, cfg.split_seed)
        test, pool = pool.subset(test_pos), pool.subset(rest)
        if cfg.true_label_column is not None:  # the test split is scored against the known true labels
            test = dataclasses.replace(test, label=test.true_label, is_corrupted=np.zeros(len(test), dtype=bool))
    train_pos, val_pos = _carve(pool.label, n_val, cfg.split_seed)
    train, val = pool.subset(train_pos), pool.subset(val_pos)
    cap = cfg.max_train_samples
    if cap is not None and len(train) > cap:
        keep = np.random.default_rng(cfg.split_seed).choice(len(train), size=cap, replace=False)
        train = train.subset(np.sort(keep))
    return {"train": train, "val": val, "test": test}


def labels_of_test_split(cfg: DataConfig) -> str:
    """Which labels the test split holds: what every test accuracy is measured against."""
    if cfg.source != "parquet":
        split = "official test split" if cfg.source != "digits" else "test split (cut before any noise)"
        return f"the clean labels of the {cfg.source} {split}"
    if cfg.test_path is not None:
        column = cfg.test_label_column or cfg.label_column
        return f"the labels of the test table data.test_path '{cfg.test_path}' (column '{column}'), as given"
    if cfg.true_label_column is not None:
        return f"the known true labels (data.true_label_column '{cfg.true_label_column}') of a test split of data.path"
    return (
        f"the labels of data.path (column '{cfg.label_column}') as given, on a test split cut from it: as noisy as "
        "the data (set data.test_path to a trusted test table)"
    )


def load_splits(cfg: DataConfig) -> dict[str, SampleSet]:
    """{'train', 'val', 'test'} clean SampleSets of `cfg.source`, validated, seeded by cfg.split_seed."""
    if cfg.source == "digits":
        pool, test, where = _load_digits()
    elif cfg.source in ("mnist", "fashion-mnist"):
        pool, test, where = _load_idx(cfg)
    elif cfg.source == "cifar10":
        pool, test, where = _load_cifar10(cfg)
    elif cfg.source == "parquet":
        pool, test, where = read_parquet_source(cfg)
    else:
        raise ConfigError(f"config key 'data.source': unknown source '{cfg.source}'")
    shape = IMAGE_SHAPES.get(cfg.source) or (tuple(cfg.shape) if cfg.shape is not None else None)
    if test is None:
        validate_samples(pool, where, shape)
    else:
        validate_samples(pool, f"{where} (train files)", shape)
        validate_samples(test, f"{where} (test files)", shape)
    return _split(pool, test, cfg, where)
