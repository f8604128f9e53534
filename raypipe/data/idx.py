"""MNIST and Fashion-MNIST from their standard IDX files, parsed with numpy.

The files are read as shipped (Debian's `dataset-fashion-mnist`, the LeCun / Zalando downloads,
torchvision's `raw/` folder), gzipped or not, so no conversion step is needed and no network is
touched unless `data.download=true`. The header is checked rather than trusted: a truncated
download or a file of the wrong kind fails loudly with the file's name instead of yielding garbage.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from raypipe.errors import DataError

# IDX type code -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# split -> (images file, labels file), without the optional ".gz".
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# Where torchvision puts the files below its `root`.
TORCHVISION_SUBDIRS = {"mnist": "MNIST/raw", "fashion-mnist": "FashionMNIST/raw"}


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        if head == b"\x1f\x8b":  # gzip magic, whatever the file is called
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"IDX file '{path}' cannot be read ({e}); delete it and fetch it again") from None


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in one IDX file (native byte order), header checked against the data length."""
    path = Path(path)
    buf = _read_bytes(path)
    if len(buf) < 4:
        raise DataError(f"IDX file '{path}' is truncated ({len(buf)} bytes, no header); fetch it again")
    if buf[0] != 0 or buf[1] != 0 or buf[2] not in IDX_DTYPES or buf[3] == 0:
        raise DataError(
            f"IDX file '{path}' has a wrong magic number 0x{buf[:4].hex()}; it is not an IDX file (or is damaged)"
        )
    dtype, ndim = IDX_DTYPES[buf[2]], buf[3]
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise DataError(f"IDX file '{path}' is truncated inside its header; fetch it again")
    dims = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(buf) - header
    if actual < expected:
        raise DataError(
            f"IDX file '{path}' is truncated: header says {dims} ({expected} bytes of data), found {actual}; "
            "fetch it again"
        )
    if actual > expected:
        raise DataError(f"IDX file '{path}' has {actual - expected} bytes after the data its header {dims} declares")
    data = np.frombuffer(buf, dtype=dtype, count=int(np.prod(dims, dtype=np.int64)), offset=header)
    return data.reshape(dims).astype(dtype.newbyteorder("="), copy=False)


def find_idx_file(directories: list[Path], name: str) -> Path | None:
    """`name` or `name.gz` in the first directory holding it (plain preferred), else None."""
    for directory in directories:
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def idx_search_dirs(root: Path, source: str) -> list[Path]:
    return [root, root / TORCHVISION_SUBDIRS[source]]


def missing_idx_files(root: Path, source: str) -> list[str]:
    dirs = idx_search_dirs(root, source)
    return [name for pair in IDX_FILES.values() for name in pair if find_idx_file(dirs, name) is None]


def idx_files(root: Path, source: str) -> list[Path]:
    """The IDX files `read_idx_split` reads under `root` (those that exist)."""
    dirs = idx_search_dirs(root, source)
    found = [find_idx_file(dirs, name) for pair in IDX_FILES.values() for name in pair]
    return [path for path in found if path is not None]


def read_idx_split(root: Path, source: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(x float32 [N, 1, H, W] in [0, 1], labels int64 [N]) of the `train` or `test` files."""
    dirs = idx_search_dirs(root, source)
    images_name, labels_name = IDX_FILES[split]
    images_path = find_idx_file(dirs, images_name)
    labels_path = find_idx_file(dirs, labels_name)
    if images_path is None or labels_path is None:
        missing = images_name if images_path is None else labels_name
        raise DataError(f"{source}: file '{missing}[.gz]' is missing in '{root}'")
    images = read_idx(images_path)  # [N, H, W]
    labels = read_idx(labels_path)  # [N]
    if images.ndim != 3:
        raise DataError(f"IDX file '{images_path}' holds an array of shape {images.shape}, expected [N, H, W] images")
    if labels.ndim != 1:
        raise DataError(f"IDX file '{labels_path}' holds an array of shape {labels.shape}, expected [N] labels")
    if len(images) != len(labels):
        raise DataError(
            f"IDX files '{images_path}' ({len(images)} images) and '{labels_path}' ({len(labels)} labels) "
            "do not match; fetch both again"
        )
    x = images.astype(np.float32)  # [N, H, W]
    if images.dtype == np.uint8:
        x /= np.float32(255.0)
    return x[:, None, :, :], labels.astype(np.int64)
