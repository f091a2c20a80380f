"""The global adapter of a round as named tensors, its content digest, its norm, and the kept copy per round.

The global state a round releases is the adapter the server evaluates (its factors and their scale), the head
and every delta merged into the base weights (FLoRA, FedEx). Its digest is a SHA-256 over the tensors in name
order (name, dtype, shape, little-endian bytes): it depends on the values only, not on a file format, so the
digest in metrics.jsonl, a kept round file and the export's manifest can be compared with each other.
(Written here because no library hashes a set of named arrays canonically; safetensors files are not
byte-stable once they carry metadata.)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

ROUNDS_DIR = "rounds"  # output.keep_rounds: rounds/round-NNNN.safetensors


def global_tensors(factors: dict, head: dict, base_delta: dict) -> dict[str, np.ndarray]:
    """The global model's trainable state as named arrays: `lora_A/<module>`, `lora_B/<module>`, `scale/<module>`
    (one value), `head/<name>`, `base_delta/<module>`."""
    out: dict[str, np.ndarray] = {}
    for name, f in factors.items():
        out[f"lora_A/{name}"] = np.asarray(f.A)
        out[f"lora_B/{name}"] = np.asarray(f.B)
        out[f"scale/{name}"] = np.asarray([float(f.scale)], np.float64)
    for name, h in head.items():
        out[f"head/{name}"] = np.asarray(h)
    for name, d in base_delta.items():
        out[f"base_delta/{name}"] = np.asarray(d)
    return out


def digest(tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        h.update(f"{name}\0{arr.dtype.str}\0{list(arr.shape)}\0".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def delta_norm(factors: dict, base_delta: dict) -> float:
    """||ΔW||_F over all modules: what the global adapter plus the merged deltas add to the base weights."""
    total = 0.0
    for name in set(factors) | set(base_delta):
        d = np.zeros((), np.float64)
        if name in factors:
            f = factors[name]
            d = float(f.scale) * (np.asarray(f.B, np.float64) @ np.asarray(f.A, np.float64))
        if name in base_delta:
            d = d + np.asarray(base_delta[name], np.float64)
        total += float(np.sum(np.square(d)))
    return float(np.sqrt(total))


def server_state(server) -> dict[str, np.ndarray]:
    """The server's global state after its last round (what `export_adapter` receives at the end)."""
    _, factors = server.global_eval_factors()
    return global_tensors(factors, server.head, server.base_delta)


def round_fields(server) -> dict:
    """The metrics-row fields that pin down the global model of the round just committed."""
    _, factors = server.global_eval_factors()
    return {"global_adapter_sha256": digest(global_tensors(factors, server.head, server.base_delta)),
            "global_delta_norm": delta_norm(factors, server.base_delta)}


def round_file(run_dir: Path, round_: int) -> Path:
    return Path(run_dir) / ROUNDS_DIR / f"round-{round_:04d}.safetensors"


def keep_round(run_dir: Path, round_: int, tensors: dict[str, np.ndarray]) -> Path:
    """Write one round's global state (output.keep_rounds), atomically."""
    from safetensors.numpy import save_file

    path = round_file(run_dir, round_)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)
    return path


def read_round(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))
