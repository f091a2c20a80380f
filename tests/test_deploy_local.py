"""scripts/deploy_local.py without Flower: `Deployment.stop()` ends what it started, by pid, with the standard
library only (no psutil), also a descendant that detached into a session of its own (as Flower's SuperLink
starts its SuperExec)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from flower_procs import load_deploy_local


# A process with a child that has a detached grandchild; the grandchild writes the child's pid and its own, then
# they all sleep. Each sleep is bounded, so nothing outlives a failed test by more than a minute.
TREE = """
import os, subprocess, sys, time
role, pids = sys.argv[1], sys.argv[2]
if role == "root":
    subprocess.Popen([sys.executable, __file__, "child", pids])
elif role == "child":
    subprocess.Popen([sys.executable, __file__, "grandchild", pids], start_new_session=True)
else:
    with open(pids + ".tmp", "w") as fh:
        fh.write(f"{os.getppid()} {os.getpid()}")
    os.replace(pids + ".tmp", pids)
time.sleep(60)
"""




def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in "ZX"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
@pytest.mark.timeout(60)
def test_stop_ends_a_started_process_its_child_and_a_detached_grandchild(tmp_path):
    deploy_local = load_deploy_local()
    assert "psutil" not in deploy_local.__dict__
    dep = deploy_local.Deployment(tmp_path / "deploy")
    script = tmp_path / "tree.py"
    script.write_text(TREE)
    pids_file = tmp_path / "pids"
    root = dep._start("tree", [sys.executable, str(script), "root", str(pids_file)])
    pids = [root.pid]
    try:
        deadline = time.monotonic() + 30
        while not pids_file.exists():
            assert time.monotonic() < deadline, "the process tree did not start"
            time.sleep(0.1)
        pids += [int(x) for x in pids_file.read_text().split()]  # the child, the grandchild
        assert all(_alive(pid) for pid in pids)
        assert os.getsid(pids[2]) != os.getsid(root.pid)  # the grandchild really left the session
        dep.stop(grace=5.0)
        assert not [pid for pid in pids if _alive(pid)]
        assert root.returncode is not None  # reaped
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, 9)
