"""Find and stop, by pid, every process a test started, including detached and orphaned descendants.

A test puts a unique value in an environment variable of everything it starts (or of itself, before Ray
starts); every descendant inherits it, also those that detach (Flower's SuperExec, the local SuperLink that
`flwr run` launches) or are re-parented when their parent exits (Ray workers). No name-based killing.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
import uuid
from pathlib import Path

import psutil

TAG_VAR = "FEDLORA_TEST_PROCS"


def load_deploy_local():
    """scripts/deploy_local.py as a module (it is a script, not part of the package)."""
    path = Path(__file__).resolve().parent.parent / "scripts" / "deploy_local.py"
    spec = importlib.util.spec_from_file_location("deploy_local", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["deploy_local"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class ProcessTag:
    def __init__(self) -> None:
        self.value = uuid.uuid4().hex

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        return {**(os.environ if base is None else base), TAG_VAR: self.value}

    def find(self) -> list[psutil.Process]:
        """Live processes carrying this tag, this test process excluded."""
        out = []
        for p in psutil.process_iter():
            if p.pid == os.getpid():
                continue
            try:
                if p.environ().get(TAG_VAR) == self.value and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except (psutil.Error, OSError):
                continue
        return out

    def wait_gone(self, timeout: float) -> list[psutil.Process]:
        """Give tagged processes `timeout` seconds to exit on their own; return those still running."""
        deadline = time.monotonic() + timeout
        left = self.find()
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = self.find()
        return left

    def stop_all(self, grace: float = 10.0) -> list[str]:
        """SIGTERM every tagged process by pid, SIGKILL what is left after `grace`; return what was running."""
        procs = self.find()
        seen = [f"{p.pid}:{_name(p)}" for p in procs]
        for p in procs:
            _signal(p, p.terminate)
        _, alive = psutil.wait_procs(procs, timeout=grace)
        for p in alive + self.find():
            _signal(p, p.kill)
        psutil.wait_procs(alive, timeout=5)
        return seen


def _name(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline()[:2]) or p.name()
    except psutil.Error:
        return "?"


def _signal(p: psutil.Process, send) -> None:
    try:
        send()
    except psutil.Error:
        pass
