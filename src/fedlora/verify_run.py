"""`fedlora verify RUN_DIR|ADAPTER_DIR`: a run folder's adapter against its manifest, the manifest against the
run's config and last round, every kept round file against its metrics row (fedlora.verify checks one adapter)."""

from __future__ import annotations

import math
from pathlib import Path

from fedlora import adapter_digest
from fedlora.config import load_config
from fedlora.errors import UserError
from fedlora.metrics import read_metrics
from fedlora.strategies import LoraFactors
from fedlora.verify import MANIFEST, VerificationError, text_sha256, verify_adapter


def verify_run(run_dir: str | Path) -> str:
    """Check a run folder: its adapter (if exported) against the manifest, the manifest against config.toml and
    the last round's digest, every kept round file against its metrics row. One line back, or VerificationError."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.toml")
    rows = read_metrics(run_dir)
    if not rows:
        raise VerificationError(f"{run_dir}: metrics.jsonl has no rounds")
    if [r.get("round") for r in rows] != list(range(1, len(rows) + 1)):
        raise VerificationError(f"{run_dir}: metrics.jsonl rounds are not 1..{len(rows)} in order")
    for r in rows:
        if not isinstance(r.get("global_adapter_sha256"), str):
            raise VerificationError(f"{run_dir}: round {r['round']} has no global_adapter_sha256 (made before digests)")
    done = []
    if (run_dir / "adapter").is_dir():
        manifest = verify_adapter(run_dir / "adapter")
        if manifest.get("config_sha256") != text_sha256(cfg.to_toml()):
            raise VerificationError(f"{run_dir}: config.toml is not the config the adapter was exported with")
        if manifest.get("global_adapter_sha256") != rows[-1]["global_adapter_sha256"]:
            raise VerificationError(f"{run_dir}: the adapter was not exported from round {rows[-1]['round']}'s "
                                    "global model (digest differs from metrics.jsonl)")
        done.append(f"adapter ({len(manifest['files'])} files, {len(manifest['tensors'])} tensors, finite)")
    kept = 0
    for r in rows:
        path = adapter_digest.round_file(run_dir, r["round"])
        if not path.is_file():
            if cfg.output.keep_rounds:
                raise VerificationError(f"{run_dir}: output.keep_rounds is set but {path.name} is missing")
            continue
        try:
            tensors = adapter_digest.read_round(path)
        except Exception as exc:  # safetensors' own error types on a damaged file
            raise VerificationError(f"{path}: unreadable ({' '.join(str(exc).split())[:200]})") from None
        if adapter_digest.digest(tensors) != r["global_adapter_sha256"]:
            raise VerificationError(f"{path}: digest differs from round {r['round']} in metrics.jsonl")
        norm = r.get("global_delta_norm")
        factors, base = _split(tensors, path)
        if norm is not None and not math.isclose(adapter_digest.delta_norm(factors, base), norm, rel_tol=1e-9,
                                                 abs_tol=1e-12):
            raise VerificationError(f"{path}: the update norm differs from round {r['round']} in metrics.jsonl")
        kept += 1
    if kept:
        done.append(f"{kept} kept rounds")
    return (f"ok: {run_dir}: {len(rows)} rounds" + (", " + ", ".join(done) if done else "")
            + f", global adapter {rows[-1]['global_adapter_sha256'][:12]}")


def _split(tensors: dict, path: Path) -> tuple[dict, dict]:
    """Kept round tensors back into (factors, base deltas) for the norm."""
    try:
        factors = {}
        for key in tensors:
            if key.startswith("lora_A/"):
                name = key.split("/", 1)[1]
                factors[name] = LoraFactors(A=tensors[key], B=tensors[f"lora_B/{name}"],
                                            scale=float(tensors[f"scale/{name}"][0]))
    except (KeyError, IndexError) as exc:
        raise VerificationError(f"{path}: not a kept round file (no {exc})") from None
    base = {n.split("/", 1)[1]: v for n, v in tensors.items() if n.startswith("base_delta/")}
    return factors, base


def verify_path(path: str | Path) -> str:
    """`fedlora verify`: a run folder or an adapter folder."""
    path = Path(path)
    if (path / "config.toml").is_file() and (path / "metrics.jsonl").is_file():
        return verify_run(path)
    if (path / MANIFEST).is_file() or (path / "adapter_config.json").is_file():
        m = verify_adapter(path)
        return (f"ok: {path}: {len(m['files'])} files, {len(m['tensors'])} tensors, all finite, "
                f"global adapter {m['global_adapter_sha256'][:12]}")
    raise UserError(f"not a run folder or an adapter folder: {path}")
