"""Unit tests of raypipe.data: sources, splits, noise and the Parquet handover (no Ray, seconds)."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raypipe.config import DataConfig, NoiseConfig
from raypipe.data import (
    ASYMMETRIC_PAIRS,
    SampleSet,
    apply_noise,
    batch_from_table,
    load_splits,
    samples_from_table,
    table_from_samples,
)
from raypipe.data.idx import read_idx
from raypipe.errors import ConfigError, DataError

# ---------------------------------------------------------------------------------------------
# Fixtures: tiny files in the real formats.


def write_idx(path: Path, array: np.ndarray, type_code: int = 0x08, gz: bool = False) -> Path:
    """An IDX file: 0, 0, type code, ndim, big-endian uint32 dims, big-endian data."""
    dtype = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[type_code]
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + np.asarray(array).astype(dtype).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def make_idx_dir(root: Path, n_train: int = 40, n_test: int = 12, gz: bool = False, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    data = {
        "train": (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), np.arange(n_train) % 10),
        "test": (rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), np.arange(n_test) % 10),
    }
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = data[split]
        write_idx(root / f"{prefix}-images-idx3-ubyte", images, gz=gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8), gz=gz)
    return data


CIFAR_NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def make_cifar_raw(per_batch: int = 4, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (pixels uint8 [n, 3072], labels int64 [n])."""
    rng = np.random.default_rng(seed)
    return {
        name: (rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8), rng.integers(0, 10, per_batch))
        for name in CIFAR_NAMES
    }


def write_cifar_binary(directory: Path, raw: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, (pixels, labels) in raw.items():
        records = np.concatenate([labels.astype(np.uint8)[:, None], pixels], axis=1)  # [n, 3073]
        (directory / f"{name}.bin").write_bytes(records.tobytes())


def write_cifar_python(directory: Path, raw: dict) -> None:
    """Pickled dicts exactly like the real cifar-10-batches-py files."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, (pixels, labels) in raw.items():
        batch = {
            b"batch_label": f"{name} of 5".encode(),
            b"labels": [int(v) for v in labels],
            b"data": pixels,
            b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
        }
        with open(directory / name, "wb") as f:
            pickle.dump(batch, f)


def write_parquet(path: Path, columns: dict, **kwargs) -> Path:
    pq.write_table(pa.table(columns), path, **kwargs)
    return path


def parquet_cfg(path, **kwargs) -> DataConfig:
    return DataConfig(source="parquet", path=str(path), **kwargs)


@pytest.fixture(scope="module")
def digits() -> dict[str, SampleSet]:
    return load_splits(DataConfig())


# ---------------------------------------------------------------------------------------------
# SampleSet.


def test_sampleset_subset_and_batches(digits):
    s = digits["val"]
    assert len(s) == len(s.sample_id) and s.sample_shape == (1, 8, 8)
    mask = s.label == 3
    sub = s.subset(mask)
    assert len(sub) == int(mask.sum()) and (sub.label == 3).all()
    picked = s.subset(np.array([4, 0, 2]))
    assert picked.sample_id.tolist() == s.sample_id[[4, 0, 2]].tolist()
    assert np.array_equal(picked.x[1], s.x[0])

    batches = list(s.batches(32))
    assert [len(b["x"]) for b in batches[:-1]] == [32] * (len(batches) - 1)
    assert set(batches[0]) == {"sample_id", "x", "label", "true_label", "is_corrupted"}
    assert np.array_equal(np.concatenate([b["sample_id"] for b in batches]), s.sample_id)
    shuffled = np.concatenate([b["sample_id"] for b in s.batches(32, shuffle=True, seed=1)])
    again = np.concatenate([b["sample_id"] for b in s.batches(32, shuffle=True, seed=1)])
    other = np.concatenate([b["sample_id"] for b in s.batches(32, shuffle=True, seed=2)])
    assert np.array_equal(shuffled, again) and not np.array_equal(shuffled, other)
    assert not np.array_equal(shuffled, s.sample_id) and sorted(shuffled) == sorted(s.sample_id)


# ---------------------------------------------------------------------------------------------
# digits and the splits.


def test_digits_loads_with_shapes_ranges_and_disjoint_splits(digits):
    total = 0
    for name, s in digits.items():
        assert s.x.dtype == np.float32 and s.x.shape[1:] == (1, 8, 8), name
        assert s.x.min() >= 0.0 and s.x.max() <= 1.0, name
        assert s.sample_id.dtype == np.int64 and s.label.dtype == np.int64
        assert np.array_equal(s.label, s.true_label) and not s.is_corrupted.any()
        assert s.num_classes == 10 and set(s.label.tolist()) == set(range(10)), name  # stratified
        assert np.all(np.diff(s.sample_id) > 0), name  # canonical order kept
        total += len(s)
    ids = np.concatenate([s.sample_id for s in digits.values()])
    assert total == 1797 and np.array_equal(np.sort(ids), np.arange(1797))  # disjoint, covering
    assert len(digits["test"]) == round(0.2 * 1797) and len(digits["val"]) == round(0.1 * 1797)
    assert digits["train"].x.max() == 1.0  # 16 / 16


def test_digits_split_deterministic_by_seed(digits):
    again = load_splits(DataConfig())
    other = load_splits(DataConfig(split_seed=1))
    for name in ("train", "val", "test"):
        assert np.array_equal(digits[name].sample_id, again[name].sample_id)
        assert np.array_equal(digits[name].x, again[name].x)
    assert not np.array_equal(digits["test"].sample_id, other["test"].sample_id)


def test_max_train_samples_caps_train_only(digits):
    capped = load_splits(DataConfig(max_train_samples=100))
    assert len(capped["train"]) == 100
    assert set(capped["train"].sample_id) <= set(digits["train"].sample_id)
    assert np.array_equal(capped["val"].sample_id, digits["val"].sample_id)
    assert np.array_equal(capped["test"].sample_id, digits["test"].sample_id)
    assert np.array_equal(load_splits(DataConfig(max_train_samples=100))["train"].sample_id, capped["train"].sample_id)


def test_zero_val_fraction_gives_empty_val():
    splits = load_splits(DataConfig(val_fraction=0.0))
    assert len(splits["val"]) == 0 and splits["val"].sample_shape == (1, 8, 8)
    assert len(splits["train"]) + len(splits["test"]) == 1797


# ---------------------------------------------------------------------------------------------
# Noise.


def test_symmetric_noise_exact_count_and_never_own_class(digits):
    train = digits["train"]
    noisy = apply_noise(train, NoiseConfig(kind="symmetric", rate=0.4, seed=3), "digits")
    flipped = noisy.is_corrupted
    assert flipped.sum() == round(0.4 * len(train))
    assert (noisy.label[flipped] != train.label[flipped]).all()
    assert np.array_equal(noisy.label[~flipped], train.label[~flipped])
    assert np.array_equal(noisy.true_label, train.true_label) and np.array_equal(noisy.x, train.x)
    assert np.array_equal(noisy.label != noisy.true_label, flipped)
    assert len(np.unique(noisy.label[flipped])) == 10  # spread over the other classes
    assert not train.is_corrupted.any() and np.array_equal(train.label, train.true_label)  # input untouched


def test_asymmetric_noise_flips_only_along_pairs_with_exact_counts(digits):
    train = digits["train"]
    rate = 0.3
    noisy = apply_noise(train, NoiseConfig(kind="asymmetric", rate=rate, seed=0), "digits")
    pairs = ASYMMETRIC_PAIRS["digits"]
    changed = noisy.label != train.label
    assert np.array_equal(changed, noisy.is_corrupted)
    for c in range(10):
        members = train.label == c
        n_changed = int((changed & members).sum())
        if c in pairs:
            assert n_changed == round(rate * members.sum()), c
            assert (noisy.label[changed & members] == pairs[c]).all(), c
        else:
            assert n_changed == 0, c


def test_asymmetric_cyclic_pairs_and_undocumented_source():
    rng = np.random.default_rng(0)
    label = np.repeat(np.arange(4), 25)
    s = SampleSet.clean(np.arange(100), rng.random((100, 5), dtype=np.float32), label, 4)
    noisy = apply_noise(s, NoiseConfig(kind="asymmetric", rate=0.2, pairs="cyclic"), "parquet")
    changed = noisy.is_corrupted
    assert changed.sum() == 4 * 5
    assert np.array_equal(noisy.label[changed], (label[changed] + 1) % 4)
    with pytest.raises(ConfigError, match="noise.pairs=cyclic"):
        apply_noise(s, NoiseConfig(kind="asymmetric", pairs="dataset"), "parquet")


def test_asymmetric_pairs_documented():
    assert ASYMMETRIC_PAIRS["cifar10"] == {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
    assert ASYMMETRIC_PAIRS["fashion-mnist"] == {0: 6, 2: 4, 5: 7, 6: 0, 4: 2}
    assert ASYMMETRIC_PAIRS["mnist"] == ASYMMETRIC_PAIRS["digits"] == {2: 7, 3: 8, 5: 6, 6: 5, 7: 1}


def test_gaussian_noise_changes_only_chosen_rows(digits):
    train = digits["train"]
    noisy = apply_noise(train, NoiseConfig(kind="gaussian", rate=0.5, sigma=4.5, seed=1), "digits")
    chosen = noisy.is_corrupted
    assert chosen.sum() == round(0.5 * len(train))
    assert noisy.x.dtype == np.float32 and noisy.x.min() >= 0.0 and noisy.x.max() <= 1.0
    assert np.array_equal(noisy.x[~chosen], train.x[~chosen])
    assert (noisy.x[chosen] != train.x[chosen]).reshape(int(chosen.sum()), -1).any(axis=1).all()
    assert np.array_equal(noisy.label, train.label) and np.array_equal(noisy.true_label, train.true_label)
    # sigma = 4.5 saturates most pixels at 0 or 1 (the paper's "near pure noise")
    assert np.isin(noisy.x[chosen], [0.0, 1.0]).mean() > 0.8
    small = apply_noise(train, NoiseConfig(kind="gaussian", rate=0.5, sigma=0.01, seed=1), "digits")
    assert np.abs(small.x - train.x).max() < 0.1


@pytest.mark.parametrize("kind", ["symmetric", "asymmetric", "gaussian"])
def test_noise_deterministic_by_seed(digits, kind):
    train = digits["train"]
    a = apply_noise(train, NoiseConfig(kind=kind, seed=7), "digits")
    b = apply_noise(train, NoiseConfig(kind=kind, seed=7), "digits")
    c = apply_noise(train, NoiseConfig(kind=kind, seed=8), "digits")
    assert np.array_equal(a.label, b.label) and np.array_equal(a.x, b.x)
    assert np.array_equal(a.is_corrupted, b.is_corrupted)
    assert not np.array_equal(a.is_corrupted, c.is_corrupted)


def test_noise_none_and_zero_rate(digits):
    train = digits["train"]
    assert apply_noise(train, NoiseConfig(kind="none"), "digits") is train
    zero = apply_noise(train, NoiseConfig(kind="symmetric", rate=0.0), "digits")
    assert not zero.is_corrupted.any() and np.array_equal(zero.label, train.label)


# ---------------------------------------------------------------------------------------------
# IDX (mnist, fashion-mnist).


@pytest.mark.parametrize("gz", [False, True])
def test_idx_source_plain_and_gzipped(tmp_path, gz):
    data = make_idx_dir(tmp_path, n_train=40, n_test=12, gz=gz)
    splits = load_splits(DataConfig(source="fashion-mnist", path=str(tmp_path), val_fraction=0.25))
    train, val, test = splits["train"], splits["val"], splits["test"]
    assert len(train) == 30 and len(val) == 10 and len(test) == 12
    assert train.sample_shape == (1, 28, 28) and train.num_classes == 10
    assert np.array_equal(test.sample_id, 40 + np.arange(12))  # official test, ids offset by train length
    assert np.array_equal(np.sort(np.concatenate([train.sample_id, val.sample_id])), np.arange(40))
    images, labels = data["test"]
    assert np.allclose(test.x[:, 0], images / 255.0) and np.array_equal(test.label, labels)
    first = int(train.sample_id[0])
    assert np.allclose(train.x[0, 0], data["train"][0][first] / 255.0)


def test_idx_torchvision_layout_found(tmp_path):
    make_idx_dir(tmp_path / "MNIST" / "raw", gz=True)
    splits = load_splits(DataConfig(source="mnist", path=str(tmp_path)))
    assert len(splits["test"]) == 12


def test_read_idx_multibyte_dtype(tmp_path):
    values = np.arange(-6, 6, dtype=np.int32).reshape(3, 4) * 100_000
    assert np.array_equal(read_idx(write_idx(tmp_path / "ints", values, type_code=0x0C)), values)
    path = write_idx(tmp_path / "long", np.zeros((2, 2), dtype=np.uint8))
    path.write_bytes(path.read_bytes() + b"\x00\x00")
    with pytest.raises(DataError, match="long' has 2 bytes after the data"):
        read_idx(path)


def test_idx_truncated_file(tmp_path):
    make_idx_dir(tmp_path)
    images = tmp_path / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte' is truncated"):
        load_splits(DataConfig(source="mnist", path=str(tmp_path)))


def test_idx_truncated_gzip(tmp_path):
    make_idx_dir(tmp_path, gz=True)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:20])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz' cannot be read"):
        load_splits(DataConfig(source="mnist", path=str(tmp_path)))


def test_idx_wrong_magic(tmp_path):
    make_idx_dir(tmp_path)
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(b"\x12\x34" + labels.read_bytes()[2:])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte' has a wrong magic number"):
        load_splits(DataConfig(source="mnist", path=str(tmp_path)))


def test_idx_count_mismatch(tmp_path):
    make_idx_dir(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(39, dtype=np.uint8) % 10)
    with pytest.raises(DataError, match=r"\(40 images\) and .*\(39 labels\) do not match"):
        load_splits(DataConfig(source="mnist", path=str(tmp_path)))


def test_idx_wrong_image_size(tmp_path):
    make_idx_dir(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((40, 32, 32), dtype=np.uint8))
    with pytest.raises(DataError, match=r"shape \(1, 32, 32\), expected \(1, 28, 28\)"):
        load_splits(DataConfig(source="mnist", path=str(tmp_path)))


def test_idx_missing_file_without_download(tmp_path):
    make_idx_dir(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.*missing.*data.download=true.*dataset-fashion-mnist"):
        load_splits(DataConfig(source="fashion-mnist", path=str(tmp_path)))


@pytest.mark.realdata
@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_real_fashion_mnist_from_debian_package():
    splits = load_splits(DataConfig(source="fashion-mnist", max_train_samples=1000))
    assert len(splits["train"]) == 1000 and len(splits["val"]) == 6000 and len(splits["test"]) == 10000
    assert splits["test"].sample_id[0] == 60000 and splits["test"].x.max() == 1.0


# ---------------------------------------------------------------------------------------------
# CIFAR-10.


def _check_cifar(splits: dict[str, SampleSet], raw: dict) -> None:
    train_pixels = np.concatenate([raw[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = np.concatenate([raw[f"data_batch_{i}"][1] for i in range(1, 6)])
    test = splits["test"]
    assert test.sample_shape == (3, 32, 32) and np.array_equal(test.sample_id, 20 + np.arange(4))
    assert np.array_equal(test.x.reshape(4, 3072), raw["test_batch"][0] / np.float32(255.0))
    assert np.array_equal(test.label, raw["test_batch"][1])
    for s in (splits["train"], splits["val"]):
        assert np.array_equal(s.x.reshape(len(s), -1), train_pixels[s.sample_id] / np.float32(255.0))
        assert np.array_equal(s.label, train_labels[s.sample_id])
    assert len(splits["train"]) + len(splits["val"]) == 20


def test_cifar10_binary_layout(tmp_path):
    raw = make_cifar_raw()
    write_cifar_binary(tmp_path / "cifar-10-batches-bin", raw)
    _check_cifar(load_splits(DataConfig(source="cifar10", path=str(tmp_path), val_fraction=0.2)), raw)


def test_cifar10_python_layout_same_as_binary(tmp_path):
    raw = make_cifar_raw()
    write_cifar_python(tmp_path / "py" / "cifar-10-batches-py", raw)
    write_cifar_binary(tmp_path / "bin", raw)
    from_py = load_splits(DataConfig(source="cifar10", path=str(tmp_path / "py"), val_fraction=0.2))
    from_bin = load_splits(DataConfig(source="cifar10", path=str(tmp_path / "bin"), val_fraction=0.2))
    _check_cifar(from_py, raw)
    for name in ("train", "val", "test"):
        assert np.array_equal(from_py[name].x, from_bin[name].x)
        assert np.array_equal(from_py[name].sample_id, from_bin[name].sample_id)


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar10_malicious_pickle_refused(tmp_path):
    raw = make_cifar_raw()
    write_cifar_python(tmp_path, raw)
    marker = tmp_path / "pwned"
    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _Exploit(marker), b"labels": [0]}, f)
    with pytest.raises(DataError, match="data_batch_3' was refused: global '(posix|os|nt).system' is not allowed"):
        load_splits(DataConfig(source="cifar10", path=str(tmp_path)))
    assert not marker.exists()


def test_cifar10_truncated_binary_and_missing_files(tmp_path):
    raw = make_cifar_raw()
    write_cifar_binary(tmp_path, raw)
    batch = tmp_path / "data_batch_2.bin"
    batch.write_bytes(batch.read_bytes()[:-10])
    with pytest.raises(DataError, match="data_batch_2.bin' is truncated"):
        load_splits(DataConfig(source="cifar10", path=str(tmp_path)))
    (tmp_path / "test_batch.bin").unlink()
    with pytest.raises(DataError, match="no complete CIFAR-10 layout.*data.download=true"):
        load_splits(DataConfig(source="cifar10", path=str(tmp_path)))


# ---------------------------------------------------------------------------------------------
# Parquet source.


def _pixel_rows(n: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, length), dtype=np.uint8)


def test_parquet_list_column_with_shape(tmp_path):
    pixels = _pixel_rows(50, 12)
    labels = np.arange(50) % 5
    path = write_parquet(tmp_path / "d.parquet", {"image": list(pixels), "label": labels})
    splits = load_splits(parquet_cfg(path, shape=[3, 2, 2]))
    assert sum(len(s) for s in splits.values()) == 50 and len(splits["test"]) == 10 and len(splits["val"]) == 5
    for s in splits.values():
        assert s.sample_shape == (3, 2, 2) and s.num_classes == 5
        assert np.array_equal(s.x.reshape(len(s), 12), pixels[s.sample_id] / np.float32(255.0))
        assert np.array_equal(s.label, labels[s.sample_id])


def test_parquet_float_values_kept_flat_and_fixed_size_list(tmp_path):
    x = np.random.default_rng(0).normal(size=(30, 6)).astype(np.float32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 6)
    path = write_parquet(tmp_path / "f.parquet", {"feat": column, "y": np.arange(30) % 3})
    splits = load_splits(parquet_cfg(path, image_column="feat", label_column="y", num_classes=4))
    train = splits["train"]
    assert train.sample_shape == (6,) and train.num_classes == 4
    assert np.array_equal(train.x, x[train.sample_id])  # floats kept as they are


def test_parquet_binary_column_and_sample_id(tmp_path):
    pixels = _pixel_rows(40, 16)
    ids = 1000 + 3 * np.arange(40)
    labels = np.arange(40) % 2
    path = write_parquet(
        tmp_path / "b.parquet",
        {"sample_id": ids, "image": pa.array([r.tobytes() for r in pixels], pa.binary()), "label": labels},
    )
    splits = load_splits(parquet_cfg(path, shape=[1, 4, 4]))
    all_ids = np.sort(np.concatenate([s.sample_id for s in splits.values()]))
    assert np.array_equal(all_ids, ids)
    for s in splits.values():
        pos = (s.sample_id - 1000) // 3
        assert np.array_equal(s.x.reshape(len(s), 16), pixels[pos] / np.float32(255.0))
        assert np.array_equal(s.label, labels[pos])


def test_parquet_directory_and_uri(tmp_path):
    pixels = _pixel_rows(40, 4)
    labels = np.arange(40) % 4
    (tmp_path / "dir").mkdir()
    write_parquet(tmp_path / "dir" / "part-1.parquet", {"image": list(pixels[20:]), "label": labels[20:]})
    write_parquet(tmp_path / "dir" / "part-0.parquet", {"image": list(pixels[:20]), "label": labels[:20]})
    for path in (tmp_path / "dir", f"file://{tmp_path / 'dir'}"):
        splits = load_splits(parquet_cfg(path))
        for s in splits.values():  # ids are row positions in sorted file order
            assert np.array_equal(s.x, pixels[s.sample_id] / np.float32(255.0))


@pytest.mark.parametrize(
    ("columns", "kwargs", "match"),
    [
        ({"pixels": [[1, 2]] * 4, "label": [0, 1, 0, 1]}, {}, "has no column 'image'"),
        ({"image": [[1, 2, 3]] * 4, "label": [0, 1, 0, 1]}, {"shape": [2, 2]}, r"data.shape \[2, 2\] holds 4 values"),
        ({"image": [[0.1, 0.2]] * 4, "label": [0, 1, 0, 5]}, {"num_classes": 3}, r"label\(s\) outside \[0, 3\)"),
        ({"image": [[0.1, 0.2]] * 4, "label": [0, 1, -1, 1]}, {}, r"outside \[0, 2\)"),
        ({"image": [[0.1, float("nan")], [0.1, 0.2]] * 2, "label": [0, 1, 0, 1]}, {}, "NaN or inf values in 2"),
        ({"image": [[0.5, 0.5]] * 4, "label": [2, 2, 2, 2]}, {}, "single class"),
        ({"image": [[1, 2], [3]] * 2, "label": [0, 1, 0, 1]}, {}, "rows have different lengths"),
        ({"image": [[1, 2]] * 4, "label": [0.0, 1.0, 0.0, 1.0]}, {}, "labels must be integers"),
        ({"image": [[1, 2]] * 4, "label": [0, 1, 0, 1], "sample_id": [1, 2, 2, 3]}, {}, "has duplicates"),
    ],
)
def test_parquet_bad_tables(tmp_path, columns, kwargs, match):
    path = write_parquet(tmp_path / "bad.parquet", columns)
    with pytest.raises(DataError, match=match):
        load_splits(parquet_cfg(path, **kwargs))


def test_parquet_empty_table_and_missing_path(tmp_path):
    schema = pa.schema([("image", pa.list_(pa.uint8())), ("label", pa.int64())])
    empty = tmp_path / "empty.parquet"
    pq.write_table(schema.empty_table(), empty)
    with pytest.raises(DataError, match="empty.parquet' holds no rows"):
        load_splits(parquet_cfg(empty))
    with pytest.raises(DataError, match="nowhere.parquet' does not exist"):
        load_splits(parquet_cfg(tmp_path / "nowhere.parquet"))
    with pytest.raises(ConfigError, match="data.path"):
        load_splits(DataConfig(source="parquet"))


def test_parquet_not_a_parquet_file(tmp_path):
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match="cannot read"):
        load_splits(parquet_cfg(junk))


# ---------------------------------------------------------------------------------------------
# Parquet handover.


def _noisy_train(digits) -> SampleSet:
    return apply_noise(digits["train"], NoiseConfig(kind="symmetric", rate=0.3), "digits")


def test_table_round_trip_exact(digits, tmp_path):
    s = _noisy_train(digits)
    table = table_from_samples(s)
    assert table.schema.field("x").type == pa.fixed_shape_tensor(pa.float32(), [1, 8, 8])
    assert [table.schema.field(k).type for k in ("sample_id", "label", "true_label", "is_corrupted")] == [
        pa.int64(),
        pa.int64(),
        pa.int64(),
        pa.bool_(),
    ]
    pq.write_table(table, tmp_path / "s.parquet")
    for t in (table, pq.read_table(tmp_path / "s.parquet")):
        back = samples_from_table(t)
        assert back.num_classes == 10 and back.sample_shape == (1, 8, 8) and back.x.dtype == np.float32
        for key in ("sample_id", "x", "label", "true_label", "is_corrupted"):
            assert np.array_equal(getattr(back, key), getattr(s, key)), key
            assert getattr(back, key).dtype == getattr(s, key).dtype, key


def test_a_table_of_the_earlier_flat_format_reads_back_the_same(digits):
    s = _noisy_train(digits)
    table = table_from_samples(s)
    flat = pa.FixedSizeListArray.from_arrays(pa.array(s.x.reshape(-1)), 64)
    old = table.set_column(1, pa.field("x", pa.list_(pa.float32(), 64)), flat)
    assert np.array_equal(samples_from_table(old).x, s.x)


def test_batch_from_sliced_table_equals_subset(digits):
    s = _noisy_train(digits)
    table = table_from_samples(s)
    # several chunks, metadata lost, as a Ray Data batch may be
    chunked = pa.concat_tables([table.slice(0, 100), table.slice(100)]).replace_schema_metadata(None)
    for start, length in ((0, 10), (37, 64), (95, 20), (len(s) - 5, 5)):
        batch = batch_from_table(chunked.slice(start, length), (1, 8, 8))
        expected = s.subset(np.arange(start, start + length))
        assert batch["x"].shape == (length, 1, 8, 8)
        for key in ("sample_id", "x", "label", "true_label", "is_corrupted"):
            assert np.array_equal(batch[key], getattr(expected, key)), (start, key)
    with pytest.raises(DataError, match="no sample_shape / num_classes metadata"):
        samples_from_table(chunked)


def test_tensor_columns_round_trip_and_name_their_width():
    from raypipe.tables import column_from_arrow, column_to_arrow, row_width

    values = np.arange(24, dtype=np.float32).reshape(4, 6)
    column = column_to_arrow(values)
    assert column.type == pa.fixed_shape_tensor(pa.float32(), [6]) and row_width(column.type) == 6
    np.testing.assert_array_equal(column_from_arrow(pa.chunked_array([column.slice(0, 2), column.slice(2)])), values)
    assert row_width(pa.list_(pa.float32(), 3)) == 3  # the earlier fixed_size_list columns
