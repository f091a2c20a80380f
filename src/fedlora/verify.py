"""Verifiable adapters: the manifest written beside every exported adapter, and the checks of `fedlora verify`.

manifest.json lists every file of the adapter folder with its SHA-256, every tensor's name, shape and dtype,
that all values are finite, the base model's identity (its name and the hashes of its config and weight files),
the hash of the run's config and the digest of the global state the adapter was exported from (the same digest
as the last metrics.jsonl row, `fedlora.adapter_digest`). Every failure is a `UserError`: one line.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fedlora.errors import UserError

MANIFEST = "manifest.json"
FORMAT = "fedlora-adapter-manifest/1"
WEIGHTS_FILE = "adapter_model.safetensors"
BASE_FILES = ("config.json", "*.safetensors", "*.bin", "*.gguf")  # what identifies a base model folder


class VerificationError(UserError):
    """An adapter or run folder that does not match its manifest or its metrics."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def base_identity(name: str, folder: str | Path) -> dict:
    """The base model's name and, when it is a local folder, the SHA-256 of its config and weight files."""
    folder = Path(folder)
    files = {}
    if folder.is_dir():
        for pattern in BASE_FILES:
            for f in sorted(folder.glob(pattern)):
                files[f.name] = file_sha256(f)
    return {"name": name, "files": files}


def _tensor_table(adapter_dir: Path) -> tuple[dict, bool]:
    """name -> {shape, dtype} of the adapter's weights, and whether every value is finite."""
    import torch
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(adapter_dir / WEIGHTS_FILE))
    except Exception as exc:  # safetensors raises its own error types on a damaged header
        raise VerificationError(f"{adapter_dir / WEIGHTS_FILE}: unreadable ({' '.join(str(exc).split())[:200]})") \
            from None
    table = {n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for n, t in sorted(tensors.items())}
    return table, all(bool(torch.isfinite(t).all()) for t in tensors.values())


def write_manifest(adapter_dir: Path, *, config_toml: str, global_sha256: str, base: dict) -> dict:
    adapter_dir = Path(adapter_dir)
    table, finite = _tensor_table(adapter_dir)
    manifest = {
        "format": FORMAT,
        "files": {f.name: file_sha256(f) for f in sorted(adapter_dir.iterdir()) if f.is_file() and f.name != MANIFEST},
        "tensors": table,
        "all_finite": finite,
        "base_model": base,
        "config_sha256": text_sha256(config_toml),
        "global_adapter_sha256": global_sha256,
    }
    (adapter_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(adapter_dir: Path) -> dict:
    path = Path(adapter_dir) / MANIFEST
    if not path.is_file():
        raise VerificationError(f"{adapter_dir}: no {MANIFEST} (not a fedlora export, or one made before manifests)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise VerificationError(f"{path}: not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise VerificationError(f"{path}: not a {FORMAT} manifest")
    return manifest


def verify_adapter(adapter_dir: str | Path) -> dict:
    """Check an adapter folder against its manifest: every file's hash, no file added or missing, tensor names,
    shapes and dtypes, all values finite. Returns the manifest; raises VerificationError (one line)."""
    adapter_dir = Path(adapter_dir)
    manifest = read_manifest(adapter_dir)
    listed = manifest.get("files") or {}
    present = {f.name for f in adapter_dir.iterdir() if f.name != MANIFEST}
    added = sorted(present - set(listed))
    if added:
        raise VerificationError(f"{adapter_dir}: {added[0]} is not in the manifest (a file was added)")
    for name, sha in sorted(listed.items()):
        if name not in present:
            raise VerificationError(f"{adapter_dir}: {name} is missing")
        if file_sha256(adapter_dir / name) != sha:
            raise VerificationError(f"{adapter_dir / name}: SHA-256 differs from the manifest (the file was changed)")
    table, finite = _tensor_table(adapter_dir)
    if table != manifest.get("tensors"):
        raise VerificationError(f"{adapter_dir}: tensor names, shapes or dtypes differ from the manifest")
    if not finite or manifest.get("all_finite") is not True:
        raise VerificationError(f"{adapter_dir}: the adapter holds non-finite values")
    return manifest


def check_base(manifest: dict, folder: str | Path) -> None:
    """Refuse a base model whose files differ from the one the adapter was trained on."""
    recorded = manifest.get("base_model") or {}
    here = base_identity(recorded.get("name", ""), folder)
    if recorded.get("files") and here["files"] != recorded["files"]:
        raise VerificationError(f"the base model {recorded.get('name')!r} here ({folder}) differs from the one the "
                                "adapter was trained on (its config or weight files have other hashes)")
