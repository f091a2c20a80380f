"""Atomic checkpoints: one `.npz` file holding every array plus the JSON structure that points at them.

Written to a temporary file, fsynced, then renamed over the previous one: a kill during the write leaves the
previous checkpoint intact (rename is atomic on POSIX file systems).
"""

from __future__ import annotations


import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.errors import UserError
from fedlora.strategies import LoraFactors

CHECKPOINT_FILE = "state.npz"
_META = "__meta__"


def pack(obj: Any, arrays: dict[str, np.ndarray], path: str = "") -> Any:
    """Replace every array (and LoraFactors) in a nested structure by a reference into `arrays`."""
    if isinstance(obj, np.ndarray):
        key = f"a{len(arrays)}"
        arrays[key] = obj
        return {"__array__": key}
    if isinstance(obj, LoraFactors):
        return {"__factors__": [pack(obj.A, arrays), pack(obj.B, arrays), float(obj.scale)]}
    if isinstance(obj, dict):
        if any(not isinstance(k, str) for k in obj):
            # NumPy integer keys (client ids drawn by an RNG) as plain ints: JSON cannot hold np.int64.
            return {"__intkeys__": [[k.item() if isinstance(k, np.generic) else k, pack(v, arrays)]
                                    for k, v in obj.items()]}
        return {k: pack(v, arrays) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [pack(v, arrays) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def unpack(obj: Any, arrays) -> Any:
    if isinstance(obj, dict):
        if "__array__" in obj:
            return np.array(arrays[obj["__array__"]])
        if "__factors__" in obj:
            A, B, scale = obj["__factors__"]
            return LoraFactors(A=unpack(A, arrays), B=unpack(B, arrays), scale=scale)
        if "__intkeys__" in obj:
            return {k: unpack(v, arrays) for k, v in obj["__intkeys__"]}
        return {k: unpack(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unpack(v, arrays) for v in obj]
    return obj


def save_checkpoint(folder: Path, state: dict) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    meta = pack(state, arrays)
    arrays[_META] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    target = folder / CHECKPOINT_FILE
    tmp = folder / f".{CHECKPOINT_FILE}.tmp"
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with open(tmp, "wb") as fh:
        fh.write(buf.getvalue())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return target


def load_checkpoint(folder: Path) -> dict:
    path = Path(folder) / CHECKPOINT_FILE
    if not path.exists():
        raise UserError(f"no checkpoint in {folder}")
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data[_META]).decode())
            return unpack(meta, data)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:  # damaged or truncated file
        raise UserError(f"checkpoint {path} is unreadable: {exc}") from None
