"""CIFAR-10 from either standard layout: the binary records or the python pickles.

Both layouts are common on shared storage (the binary one from the C tools, the python one from
torchvision), so raypipe reads either as found. The python layout is a set of pickles, and a
pickle can run arbitrary code when loaded; a data path is user input, so the pickles are read
with an unpickler that admits only the few numpy globals an array needs and refuses everything
else.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from raypipe.errors import DataError

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    from numpy.core.numeric import _frombuffer  # type: ignore[no-redef]

TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
SUBDIRS = ("", "cifar-10-batches-bin", "cifar-10-batches-py")
RECORD_BYTES = 1 + 3 * 32 * 32  # binary layout: 1 label byte, then 3072 pixel bytes (R, G, B planes)

# The only globals a pickle of numpy arrays needs (numpy 1 and 2 module names; protocols 2-5).
# `_codecs.encode` is how Python 3 writes bytes under protocol 2; it only turns a str into bytes.
SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global outside SAFE_GLOBALS (a corrupt pickle raises other errors)."""


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only SAFE_GLOBALS: plain containers and numpy arrays, no code."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedGlobal(f"global '{module}.{name}' is not allowed") from None


def safe_load_pickle(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return SafeUnpickler(f, encoding="bytes").load()
    except RefusedGlobal as e:
        raise DataError(f"cifar10 file '{path}' was refused: {e} (a CIFAR batch holds only arrays and lists)") from None
    except Exception as e:  # truncated or garbage: EOFError, ValueError, TypeError, ...
        raise DataError(f"cifar10 file '{path}' is not a readable CIFAR batch ({type(e).__name__}: {e})") from None


def _read_python_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(pixels uint8 [n, 3072], labels int64 [n]) of one python-layout batch."""
    batch = safe_load_pickle(path)
    if not isinstance(batch, dict):
        raise DataError(f"cifar10 file '{path}' holds a {type(batch).__name__}, expected a dict of b'data', b'labels'")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"cifar10 file '{path}': b'data' is {got}, expected a uint8 array [n, 3072]")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"cifar10 file '{path}': b'labels' is not a list of integers") from None
    if labels.shape != (len(data),):
        raise DataError(f"cifar10 file '{path}' has {len(data)} images but labels of shape {labels.shape}")
    return data, labels


def _read_binary_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(pixels uint8 [n, 3072], labels int64 [n]) of one binary-layout batch."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % RECORD_BYTES:
        raise DataError(
            f"cifar10 file '{path}' is truncated or not a CIFAR-10 binary batch: {raw.size} bytes is not a "
            f"multiple of {RECORD_BYTES}-byte records; fetch it again"
        )
    records = raw.reshape(-1, RECORD_BYTES)  # [n, 1 + 3072]
    return records[:, 1:], records[:, 0].astype(np.int64)


def _find_layout(root: Path) -> tuple[str, Path] | None:
    """('binary' | 'python', directory) of the first complete layout under `root`."""
    for sub in SUBDIRS:
        directory = root / sub if sub else root
        if all((directory / f"{name}.bin").is_file() for name in [*TRAIN_BATCHES, TEST_BATCH]):
            return "binary", directory
        if all((directory / name).is_file() for name in [*TRAIN_BATCHES, TEST_BATCH]):
            return "python", directory
    return None


def has_cifar10(root: Path) -> bool:
    return _find_layout(root) is not None


def cifar10_files(root: Path) -> list[Path]:
    """The batch files `read_cifar10` reads under `root` ([] without a complete layout)."""
    found = _find_layout(root)
    if found is None:
        return []
    layout, directory = found
    suffix = ".bin" if layout == "binary" else ""
    return [directory / f"{name}{suffix}" for name in [*TRAIN_BATCHES, TEST_BATCH]]


def read_cifar10(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'train': (x, labels), 'test': (x, labels)}, x float32 [N, 3, 32, 32] in [0, 1], labels int64 [N].

    Train is data_batch_1..5 in order, so a sample's position is its canonical id.
    """
    found = _find_layout(root)
    if found is None:
        raise DataError(
            f"cifar10: no complete CIFAR-10 layout in '{root}' (data_batch_1..5 and test_batch, as .bin files or "
            "python pickles, optionally in cifar-10-batches-bin/ or cifar-10-batches-py/); "
            "point data.path at it or pass data.download=true"
        )
    layout, directory = found
    read = _read_binary_batch if layout == "binary" else _read_python_batch
    suffix = ".bin" if layout == "binary" else ""
    out = {}
    for split, names in (("train", TRAIN_BATCHES), ("test", [TEST_BATCH])):
        parts = [read(directory / f"{name}{suffix}") for name in names]
        pixels = np.concatenate([p for p, _ in parts])  # uint8 [N, 3072]
        labels = np.concatenate([lab for _, lab in parts])
        x = pixels.reshape(-1, 3, 32, 32).astype(np.float32) / np.float32(255.0)
        out[split] = (x, labels)
    return out
