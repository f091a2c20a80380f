"""Atomic checkpoints: one `.npz` file holding every array plus the JSON structure that points at them.

Written to a temporary file, fsynced, then renamed over the previous one: a kill during the write leaves the
previous checkpoint intact (rename is atomic on POSIX file systems). The structure cannot mistake data for its
own references (see FORMAT below); a file it did not write, or whose references do not resolve, is one
"unreadable" line (UserError), never a different state.
"""

from __future__ import annotations


import io
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.errors import UserError
from fedlora.strategies import LoraFactors

CHECKPOINT_FILE = "state.npz"
_META = "__meta__"
FORMAT = 2  # 2: references are "$"-keyed one-key objects and user keys starting with "$" are escaped

# The JSON structure holds the state's own dicts as objects; a reference is a one-key object whose key starts
# with "$" ({"$array": "a0"}, {"$factors": [A, B, scale]}, {"$map": [[key, value], ...]} for non-text keys).
# Every key of the state's dicts that starts with "$" is written with one more "$", so no data (a client's
# report holding {"$array": ...}, or {"__array__": ...} as format 1 read it) can be read back as a reference.
_ESC = "$"
_ARRAY, _FACTORS, _MAP = "$array", "$factors", "$map"
_ARRAY_NAME = re.compile(r"a[0-9]{1,9}")


class CheckpointFormatError(ValueError):
    """A structure this module did not write: a dangling reference, an unknown marker, a wrong shape."""


def _escape(key: str) -> str:
    return _ESC + key if key.startswith(_ESC) else key


def pack(obj: Any, arrays: dict[str, np.ndarray]) -> Any:
    """The JSON-ready form of a nested structure, every array (and LoraFactors) replaced by a reference into
    `arrays`."""
    if isinstance(obj, np.ndarray):
        key = f"a{len(arrays)}"
        arrays[key] = obj
        return {_ARRAY: key}
    if isinstance(obj, LoraFactors):
        return {_FACTORS: [pack(obj.A, arrays), pack(obj.B, arrays), float(obj.scale)]}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {_escape(k): pack(v, arrays) for k, v in obj.items()}
        # NumPy integer keys (client ids drawn by an RNG) as plain ints: JSON cannot hold np.int64.
        pairs = [[k.item() if isinstance(k, np.generic) else k, pack(v, arrays)] for k, v in obj.items()]
        if any(not isinstance(k, (str, int, float, bool, type(None))) for k, _ in pairs):
            raise TypeError(f"a checkpoint cannot hold a dict key of type {type(pairs[0][0]).__name__}")
        return {_MAP: pairs}
    if isinstance(obj, (list, tuple)):
        return [pack(v, arrays) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def unpack(obj: Any, arrays) -> Any:
    """`pack`'s structure back; CheckpointFormatError on anything `pack` cannot have written."""
    if isinstance(obj, list):
        return [unpack(v, arrays) for v in obj]
    if not isinstance(obj, dict):
        return obj
    markers = [k for k in obj if k.startswith(_ESC) and not k.startswith(_ESC * 2)]
    if not markers:
        return {k[1:] if k.startswith(_ESC) else k: unpack(v, arrays) for k, v in obj.items()}
    if len(obj) != 1 or markers[0] not in (_ARRAY, _FACTORS, _MAP):
        raise CheckpointFormatError(f"unknown reference {sorted(obj)[:3]}")
    value = obj[markers[0]]
    if markers[0] == _ARRAY:
        if not isinstance(value, str) or not _ARRAY_NAME.fullmatch(value) or value not in arrays.keys():
            raise CheckpointFormatError(f"it refers to array {str(value)[:20]!r}, which it does not hold")
        return np.array(arrays[value])
    if markers[0] == _FACTORS:
        if not isinstance(value, list) or len(value) != 3 or isinstance(value[2], bool) \
                or not isinstance(value[2], (int, float)):
            raise CheckpointFormatError("a LoRA factors reference is not [A, B, scale]")
        A, B = unpack(value[0], arrays), unpack(value[1], arrays)
        if not isinstance(A, np.ndarray) or not isinstance(B, np.ndarray):
            raise CheckpointFormatError("a LoRA factors reference does not hold two arrays")
        return LoraFactors(A=A, B=B, scale=float(value[2]))
    if not isinstance(value, list) or any(not isinstance(p, list) or len(p) != 2 or isinstance(p[0], (list, dict))
                                          for p in value):
        raise CheckpointFormatError("a map reference is not a list of [key, value] pairs")
    return {k: unpack(v, arrays) for k, v in value}


def save_checkpoint(folder: Path, state: dict) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    meta = {"format": FORMAT, "state": pack(state, arrays)}
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
            if not isinstance(meta, dict) or meta.get("format") != FORMAT or "state" not in meta:
                raise CheckpointFormatError(f"not a format-{FORMAT} checkpoint (written by an older fedlora?)")
            return unpack(meta["state"], data)  # arrays read as referenced; the name pattern excludes _META
    except (OSError, ValueError, KeyError, EOFError, RecursionError, zipfile.BadZipFile) as exc:  # damaged file
        raise UserError(f"checkpoint {path} is unreadable: {one_line(exc)}") from None


def one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__
