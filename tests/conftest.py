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


@pytest.fixture
def server_task_identity():
    """Messages take the sender's identity from Flower's TaskIdentity, as inside a real ServerApp process (the
    tests that drive fedlora's Flower transport in this process)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "deployment: starts a real SuperLink and SuperNodes on 127.0.0.1 (pytest -m deployment)"
    )


# Under pytest-xdist (`-n 2 --dist loadgroup`, see pyproject's addopts): the tests that start Flower processes
# (Ray, a SuperLink, SuperNodes) or `fedlora` subprocesses run one after the other in one worker, as they did
# without xdist; the tests that build and read the cached LLM conversion likewise in one worker; the rest spreads
# over both, the Flower tests that drive the transport in this process (test_flower_loop, _replies, _wire)
# included: that group is the longest, and they start no process.
GROUPS = {"processes": ("test_flower_deploy", "test_flower_sim", "test_flower_secagg", "test_deploy", "test_resume",
                        "test_faults"),
          "llm": ("test_causal_lm", "test_chat", "test_instruct_bench", "test_eval_run",
                  "test_instruction_partitions"),
          "bench": ("test_bench",)}  # its tests reuse the suites' cached outputs within one worker


def pytest_collection_modifyitems(config, items):
    for item in items:
        for group, modules in GROUPS.items():
            if item.module.__name__.startswith(modules):
                item.add_marker(pytest.mark.xdist_group(group))
