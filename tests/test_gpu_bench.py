"""bench/gpu.py's CPU-side pieces (the script itself runs where a GPU is lent; its --quick form runs in
tests/test_bench.py): the synthetic CIFAR-shaped set it writes is what raypipe's Parquet source reads,
seeded, and learnable; the throughput it reports is samples over seconds per GPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from raypipe.config import DataConfig
from raypipe.data import load_splits

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def gpu_bench():
    sys.path.insert(0, str(BENCH))  # the bench scripts import their `common`
    try:
        spec = importlib.util.spec_from_file_location("bench_gpu", BENCH / "gpu.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


def test_synthetic_cifar_is_read_by_the_parquet_source_seeded_and_learnable(gpu_bench, tmp_path):
    path = tmp_path / "synthetic.parquet"
    gpu_bench.synthetic_cifar(path, 600, seed=3, chunk=256)  # several chunks
    cfg = DataConfig(source="parquet", path=str(path), shape=[3, 32, 32], num_classes=10, test_fraction=0.25)
    splits = load_splits(cfg)
    train, test = splits["train"], splits["test"]
    assert len(train) + len(splits["val"]) + len(test) == 600
    assert train.x.shape[1:] == (3, 32, 32) and train.x.dtype == np.float32
    assert train.x.min() >= 0.0 and train.x.max() <= 1.0 and set(np.unique(train.label)) == set(range(10))
    # Seeded: the same file again; another seed, other images.
    again, other = tmp_path / "again.parquet", tmp_path / "other.parquet"
    gpu_bench.synthetic_cifar(again, 600, seed=3, chunk=256)
    gpu_bench.synthetic_cifar(other, 600, seed=4, chunk=256)
    assert again.read_bytes() == path.read_bytes() and other.read_bytes() != path.read_bytes()
    # Learnable: the nearest class mean of the training images labels the test images.
    means = np.stack([train.x[train.label == c].mean(axis=0).ravel() for c in range(10)])
    distance = ((test.x.reshape(len(test), 1, -1) - means[None]) ** 2).sum(axis=2)
    assert (distance.argmin(axis=1) == test.label).mean() > 0.95


def test_throughput_is_samples_over_seconds_per_gpu(gpu_bench):
    history = [{"n": 100}, {"n": 100}]
    manifests = {
        "attribution": {"summary": {"rows": 1000}, "seconds": 4.0},
        "f_ft": {"summary": {"history": history}},
        "l_ft": {"summary": {"history": history}},
    }
    report = {
        "routes": {
            "f_ft": {"num_workers": 2, "seconds_train": 2.0},  # 2 workers, each saw 200 samples in 2 s
            "l_ft": {"num_workers": 1, "seconds_train": 0.5},
        }
    }
    rates = gpu_bench.throughput(report, manifests, gpus=2)
    assert rates["attribution"]["samples_per_s_per_gpu"] == pytest.approx(1000 / 4.0 / 2)
    assert rates["f_ft"]["samples"] == 400 and rates["f_ft"]["samples_per_s_per_gpu"] == pytest.approx(100.0)
    assert rates["l_ft"]["samples_per_s_per_gpu"] == pytest.approx(400.0)
