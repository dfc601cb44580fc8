"""Shared helpers for the spectral tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Power iteration runs thousands of tiny ops: on a busy machine, two OpenMP threads spin at
    barriers and make them 10-50x slower. One thread keeps these tests fast and steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
