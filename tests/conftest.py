"""Shared test fixtures: one thread for unit tests, and one local Ray cluster per test module.

Fault injection (a Train worker killed mid-epoch, a Tune trial that crashes) lives in tests only:
`tests/faults` is installed in every Ray worker process by Ray's ``worker_process_setup_hook`` and
wraps raypipe functions there; a test arms it by writing a small JSON file into the directory the
fixture `faults` gives it. Unarmed, the wrappers call through.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def one_thread():
    """Unit tests use tiny matrices: one torch / BLAS thread beats contending for a busy machine's CPUs.
    Opt in per module with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def faults(tmp_path_factory) -> Path:
    """The directory the fault hooks of this module's Ray workers read their orders from."""
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def ray_cluster(faults):
    """A local Ray cluster of this module's own (2 CPUs, no dashboard), with the fault hooks installed
    in its workers; yields its GCS address."""
    ray = pytest.importorskip("ray")
    # The Train controller collects each epoch's report when it polls (passed from this driver to the
    # controller and the workers): poll often, as raypipe.distributed.ray_executor.init_ray does.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    runtime_env = {
        "py_modules": [str(TESTS / "faults")],
        "worker_process_setup_hook": "faults.install",
        "env_vars": {"RAYPIPE_TEST_FAULTS": str(faults)},
    }
    # address="local": a fresh cluster of our own even when another one runs on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", runtime_env=runtime_env)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def data_set_folders():
    """A function: run folder -> {folder relative to it: its expected row count} for EVERY folder under it that
    holds Parquet files, found by walking the folder (not by asking raypipe), each checked to hold no other
    data set beneath it: val / test hold their splits' rows (as do the attribution's and the partition's val/,
    val_cleaned/ the validation samples detected as clean), every other one a row per training sample."""

    def found(run: Path) -> dict[str, int]:
        import json

        rows = json.loads((run / "data" / "_manifest.json").read_text())["summary"]["rows"]
        folders = sorted({p.parent.relative_to(run).as_posix() for p in run.rglob("*.parquet")})
        for outer in folders:
            nested = [inner for inner in folders if inner.startswith(outer + "/")]
            assert not nested, f"{outer} holds other data sets: {nested}"

        def expected(f: str) -> int:
            if f == "partition/val_cleaned":  # the validation samples the partition judged clean
                import pandas as pd

                return int(pd.read_parquet(run / "partition" / "val")["is_clean"].sum())
            return rows["val" if f.endswith("/val") else "test" if f == "data/test" else "train"]

        return {f: expected(f) for f in folders}

    return found
