"""Shared test fixtures (keep this file tiny)."""

from __future__ import annotations

import pytest


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
