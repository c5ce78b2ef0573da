"""Settings shared by every test."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tests use tiny tensors: one thread is fastest, and thread synchronisation on a shared 2-core CPU is slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
