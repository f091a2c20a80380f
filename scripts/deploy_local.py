#!/usr/bin/env python3
"""A real Flower deployment of a fedlora experiment on this machine: TLS, SuperNode authentication, one
SuperLink and N SuperNodes as separate processes on 127.0.0.1, the experiment run with `flwr run`.

    python scripts/deploy_local.py                       # 2 SuperNodes, configs/flower-demo.toml
    python scripts/deploy_local.py --nodes 3 -o federation.rounds=3 -o strategy.name=rbla

Steps (docs/deployment.md explains each for several machines):
  1. TLS: a throw-away CA and a server certificate for 127.0.0.1/localhost, made with openssl (TLS_COMMANDS).
  2. One ECDSA P-384 key pair per SuperNode, OpenSSH format (as `ssh-keygen -t ecdsa -b 384 -N ""` writes).
  3. SuperLink with TLS and `--enable-supernode-auth`; only registered public keys may connect.
  4. `flwr supernode register <key>.pub <connection>` for each SuperNode's public key.
  5. SuperNodes with `--node-config "partition-id=K num-partitions=N"` and their private keys.
  6. `flwr run . <connection> --stream` with the fedlora config in `--run-config`.
Every process started here is stopped by its pid (with its descendants) at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONNECTION = "fedlora-local"

# The openssl commands, run in the certificates folder ({days}: validity).
TLS_COMMANDS = [
    "openssl req -x509 -newkey rsa:2048 -nodes -days {days} -keyout ca.key -out ca.crt -subj /CN=fedlora-local-ca",
    "openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=127.0.0.1",
    "openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days {days} -out server.pem"
    " -extfile server.ext",
]
SERVER_EXT = "subjectAltName = IP:127.0.0.1, DNS:localhost\n"


class DeployError(RuntimeError):
    """A step of the deployment failed: one line, with the log file to read."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_certificates(folder: Path, days: int = 2) -> Path:
    """CA and server certificate (SAN 127.0.0.1, localhost) with openssl; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "server.ext").write_text(SERVER_EXT)
    for cmd in TLS_COMMANDS:
        done = subprocess.run(shlex.split(cmd.format(days=days)), cwd=folder, capture_output=True, text=True)
        if done.returncode != 0:
            raise DeployError(f"openssl failed: {cmd.split(' -')[0]}: {done.stderr.strip().splitlines()[-1:]}")
    return folder


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """ECDSA P-384 key pair in OpenSSH format: (private key, public key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public


@dataclass
class Deployment:
    """The processes of one local deployment, kept by pid so that `stop()` ends exactly them."""

    workdir: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    port: int = 0
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.flwr_home = self.workdir / "flwr-home"  # Flower config of this deployment only, not ~/.flwr
        self.certs = self.workdir / "certs"
        self.port = self.port or free_port()
        # Flower starts its helpers (flower-superexec, flwr-serverapp, flwr-clientapp) by name: find this
        # environment's first, also when it was not activated (`.venv/bin/python scripts/deploy_local.py`).
        path = os.pathsep.join([str(Path(sys.executable).parent), self.env.get("PATH", "")])
        self.env = {**self.env, "PATH": path, "FLWR_HOME": str(self.flwr_home), "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1"}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self, name: str) -> Path:
        return self.workdir / "logs" / f"{name}.log"

    def _exe(self, name: str) -> str:
        return shutil.which(name, path=self.env["PATH"]) or name

    def _start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        cmd = [self._exe(cmd[0]), *cmd[1:]]
        # Own session: a Ctrl-C in the terminal reaches this script only, which then stops them by pid.
        with self.log(name).open("w") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**self.env, **(env or {})},
                                    cwd=self.workdir, start_new_session=True)
        self.procs[name] = proc
        return proc

    def _flwr(self, *args: str, timeout: float = 120.0, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([self._exe("flwr"), *args], env=self.env, cwd=cwd or self.workdir, capture_output=True,
                              text=True, timeout=timeout)

    def start_superlink(self, timeout: float = 60.0) -> None:
        self._start("superlink", [
            "flower-superlink", "--ssl-ca-certfile", str(self.certs / "ca.crt"),
            "--ssl-certfile", str(self.certs / "server.pem"), "--ssl-keyfile", str(self.certs / "server.key"),
            "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(self.port),
            # fedlora is installed on this machine; Flower would otherwise `uv sync` the app's dependencies.
            "--disable-runtime-dependency-installation",
        ])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs["superlink"].poll() is not None:
                code = self.procs["superlink"].returncode
                raise DeployError(f"SuperLink exited with code {code}; see {self.log('superlink')}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise DeployError(f"SuperLink did not listen on {self.address} within {timeout:.0f}s; "
                              f"see {self.log('superlink')}")
        self.write_connection()

    def write_connection(self) -> None:
        """The Flower config's SuperLink connection: address and the CA that signed the SuperLink's certificate."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{self.address}"\n'
            f'root-certificates = "{self.certs / "ca.crt"}"\n'
        )

    def register(self, public_key: Path) -> None:
        done = self._flwr("supernode", "register", str(public_key), CONNECTION)
        if done.returncode != 0 or "registered successfully" not in done.stdout:
            raise DeployError(f"registering {public_key.name} failed: {(done.stdout + done.stderr).strip()[-300:]}")

    def start_supernode(self, name: str, private_key: Path, partition: int, num_partitions: int,
                        extra: list[str] = (), threads: int | None = None,
                        node_config: dict[str, str | int | float] | None = None) -> subprocess.Popen:
        """`threads`: torch threads of this node's ClientApp processes; co-located nodes should share the cores.
        `node_config`: more --node-config keys, e.g. a device profile {"flaas-memory-mb": 2048, ...}."""
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else None
        more = "".join(f" {k}={_toml_value(v)}" for k, v in (node_config or {}).items())
        return self._start(name, [
            "flower-supernode", "--superlink", self.address, "--root-certificates", str(self.certs / "ca.crt"),
            "--auth-supernode-private-key", str(private_key),
            "--node-config", f"partition-id={partition} num-partitions={num_partitions}{more}",
            "--port", str(free_port()),  # the SuperNode's own runtime API, for its ClientApp processes
            *extra,
        ], env)

    def run(self, run_config: dict[str, str | int | float | bool],
            timeout: float = 1800.0) -> subprocess.CompletedProcess:
        """`flwr run <app> <connection> --stream`: returns when the run has finished; output in logs/flwr-run.log."""
        items = " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())
        done = self._flwr("run", str(ROOT), CONNECTION, "--stream", "--run-config", items, timeout=timeout)
        self.log("flwr-run").write_text(done.stdout + done.stderr)
        return done

    def stop(self, grace: float = 10.0) -> None:
        """Stop every started process and its descendants by pid: SIGTERM, then SIGKILL after `grace`."""
        victims: dict[int, int] = {}  # pid -> start time, so that a pid reused meanwhile is never signalled
        for proc in self.procs.values():
            for pid in [*_descendants(proc.pid), proc.pid]:  # children first read: they may detach
                if (start := _start_time(pid)) is not None:
                    victims[pid] = start
        alive = self._signal(victims, signal.SIGTERM, grace)
        self._signal(alive, signal.SIGKILL, 5.0)
        for proc in self.procs.values():
            proc.poll()

    def _signal(self, victims: dict[int, int], sig: int, wait: float) -> dict[int, int]:
        """Send `sig` to each live victim, wait up to `wait` seconds for them to exit; return those still alive."""
        roots = {proc.pid for proc in self.procs.values()}
        for pid, start in victims.items():
            if _start_time(pid) != start:
                continue
            try:
                if not _HAVE_PROC and pid in roots:
                    os.killpg(pid, sig)  # no /proc (macOS): its process group stands in for its descendants
                else:
                    os.kill(pid, sig)
            except OSError:  # gone meanwhile, or not ours
                pass
        deadline = time.monotonic() + wait
        while True:
            for proc in self.procs.values():
                proc.poll()  # reap the ones that exited: a zombie counts as stopped
            alive = {pid: start for pid, start in victims.items() if _start_time(pid) == start}
            if not alive or time.monotonic() >= deadline:
                return alive
            time.sleep(0.2)


_HAVE_PROC = Path("/proc/self/stat").exists()


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...), or None if there is no such process."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return data[data.rindex(b")") + 2:].decode().split()


def _start_time(pid: int) -> int | None:
    """A live (not zombie) process's start time, which tells it from a later process with the same pid; None if
    it is gone. Without /proc: 0 for any live pid."""
    if not _HAVE_PROC:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0
    fields = _stat(pid)
    return None if fields is None or fields[0] in "ZX" else int(fields[19])


def _descendants(root: int) -> list[int]:
    """Every descendant of `root`, also those in a session of their own, children before grandchildren (Linux
    /proc; empty without it)."""
    if not _HAVE_PROC:
        return []
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(0), [])
        found += kids
        todo += kids
    return found


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace('"', "'") + '"'


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=2, help="number of SuperNodes (= federation.num_clients)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "flower-demo.toml"), help="fedlora TOML")
    ap.add_argument("-o", "--override", action="append", default=[], help="fedlora key=value (repeatable)")
    ap.add_argument("--workdir", default=None,
                    help="certificates, keys, logs and the run folder (default: runs/deploy-<time>)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds for the whole run")
    args = ap.parse_args(argv)

    workdir = Path(args.workdir or ROOT / "runs" / f"deploy-{datetime.now():%Y%m%d-%H%M%S}")
    dep = Deployment(workdir)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the `finally` below on kill, too
    try:
        print(f"[1/6] TLS certificates in {make_certificates(dep.certs)}")
        keys = [make_node_key(dep.workdir / "keys", f"supernode-{k}") for k in range(args.nodes)]
        print(f"[2/6] {args.nodes} SuperNode key pairs (ECDSA P-384) in {dep.workdir / 'keys'}")
        dep.start_superlink()
        print(f"[3/6] SuperLink on {dep.address} (TLS, SuperNode auth), pid {dep.procs['superlink'].pid}")
        for _, public in keys:
            dep.register(public)
        print(f"[4/6] registered {args.nodes} public keys")
        threads = max(1, (os.cpu_count() or 1) // args.nodes)  # all nodes share this machine's cores
        for k, (private, _) in enumerate(keys):
            dep.start_supernode(f"supernode-{k}", private, k, args.nodes, threads=threads)
        print(f"[5/6] SuperNodes: " + ", ".join(f"{n} pid {p.pid}" for n, p in dep.procs.items() if n != "superlink"))
        overrides = [f"federation.num_clients={args.nodes}", *args.override]
        run_dir = dep.workdir / "run"
        print(f"[6/6] flwr run {ROOT.name} {CONNECTION} --stream (log: {dep.log('flwr-run')})")
        done = dep.run({"config": str(Path(args.config).resolve()), "overrides": " ".join(overrides),
                        "out": str(run_dir)}, timeout=args.timeout)
        print(done.stdout[-3000:])
        if done.returncode != 0 or not (run_dir / "summary.json").exists():
            why = [x for x in (done.stdout + done.stderr).splitlines() if x.startswith("fedlora: error:")]
            raise DeployError((why[0] + "; " if why else "") + f"the run did not finish; see {dep.log('flwr-run')}")
        print(f"run folder: {run_dir}")
        return 0
    except (DeployError, subprocess.TimeoutExpired) as exc:
        print(f"deploy_local: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("deploy_local: interrupted", file=sys.stderr)
        return 130
    finally:
        dep.stop()
        print(f"stopped {len(dep.procs)} processes (and their children) by pid")


if __name__ == "__main__":
    sys.exit(main())
