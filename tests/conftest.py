"""Shared pytest setup: markers beyond pyproject's (registered here so `-m` selects them without warnings), and
the one-torch-thread fixture of the in-process model tests."""

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """One intra-op thread in this process (subprocesses and Ray actors get OMP_NUM_THREADS=1 too): on a shared
    2-core machine two threads wait on each other at every op and run several times slower. Results do not
    depend on it."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "deployment: starts a real SuperLink and SuperNodes on 127.0.0.1 (pytest -m deployment)"
    )
