"""Compressed uploads (`federation.compression = none | fp16 | int8 | topk`): pure codecs and the client/server
halves that put a client's sent tensors on the wire and read them back.

A lossy codec acts on the *change* of each sent tensor against the reference both sides hold bit-identically
(what the server sent this round, as float32): the server decodes the change and adds its own copy of the
reference. Quantizing the change instead of the value keeps the error proportional to what moved this round.

- `fp16`: the change in half precision (2 bytes a value).
- `int8`: the change stochastically rounded to int8 with a float32 scale per tensor or per row
  (`federation.int8_scale`; rows along a tensor's short side: one per LoRA slot); E[decoded] = change exactly
  (unbiased), 1 byte a value + 4 per scale.
- `topk`: the `federation.topk_fraction` largest entries (by magnitude) of change + residual, sent as int32
  indices and float32 values (8 bytes each). What is not sent stays in the client's error-feedback residual
  (`ef/<tensor>` in its `ClientStateStore`, saved per round so resume is exact) and is added next round.
- `none`: the float32 values as before (4 bytes a value); nothing here touches them.

Bytes counted are the payload's array bytes (values, scales, indices), as for float32 payloads elsewhere.

Privacy: with DP-SGD (privacy.mode=sample) the update is private before it is encoded; encoding is
post-processing. With client-level DP the server clips and noises the *decoded* update, so the guarantee is
unchanged (top-k's residual is client-private state; each round's contribution is still clipped). Secure
aggregation quantizes to its own integer field and sums under masks: it runs with compression=none only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

CODECS = ("none", "fp16", "int8", "topk")
EF_PREFIX = "ef/"  # client-state keys of the top-k residual
_INT8_MAX = 127  # symmetric range: -127..127, so a scale maps max |x| exactly onto the grid's end


@dataclass(frozen=True)
class CompressionSpec:
    codec: str = "none"
    int8_scale: str = "row"  # "row" (one scale per row of a 2-D tensor) or "tensor"
    topk_fraction: float = 0.1

    def __post_init__(self):
        if self.codec not in CODECS:
            raise ValueError(f"unknown compression {self.codec!r}; expected one of {', '.join(CODECS)}")
        if self.int8_scale not in ("row", "tensor"):
            raise ValueError(f"int8_scale must be 'row' or 'tensor', got {self.int8_scale!r}")
        if not 0.0 < self.topk_fraction <= 1.0:
            raise ValueError(f"topk_fraction must be in (0, 1], got {self.topk_fraction}")

    @property
    def lossy(self) -> bool:
        return self.codec != "none"

    @classmethod
    def from_config(cls, cfg) -> "CompressionSpec":
        f = cfg.federation
        return cls(f.compression, f.int8_scale, f.topk_fraction)


# -- codecs on one array ----------------------------------------------------------------------------------------
def topk_count(size: int, fraction: float) -> int:
    return max(1, min(size, math.ceil(fraction * size)))


def _transposed(shape: tuple[int, ...], per_row: bool) -> bool:
    """Per-row scales go along a 2-D tensor's short side: one per LoRA slot (a row of A, a column of B), so a
    d_out x r B pays r scales, not d_out (4 bytes each would cost half as much again as its int8 values)."""
    return per_row and len(shape) == 2 and shape[0] > shape[1]


def _row_view(x: np.ndarray, per_row: bool) -> np.ndarray:
    """2-D: one row per scale (a 1-D or per-tensor array is one row)."""
    if not per_row or x.ndim != 2:
        return x.reshape(1, -1)
    return x.T if _transposed(x.shape, per_row) else x


def _from_rows(rows: np.ndarray, shape: tuple[int, ...], per_row: bool) -> np.ndarray:
    return (rows.T if _transposed(shape, per_row) else rows).reshape(shape)


def n_scales(shape: tuple[int, ...], spec: "CompressionSpec") -> int:
    return min(shape) if spec.int8_scale == "row" and len(shape) == 2 else 1


def encode_array(x: np.ndarray, spec: CompressionSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """suffix -> array: what goes on the wire for the float array `x` (the change of one tensor)."""
    x = np.asarray(x, dtype=np.float32)
    if spec.codec == "none":
        return {"v": x}
    if spec.codec == "fp16":
        # Clip to the half range: a change beyond it would decode as inf and the server would reject the client.
        return {"h": np.clip(x, -65504.0, 65504.0).astype(np.float16)}
    if spec.codec == "int8":
        rows = _row_view(x, spec.int8_scale == "row").astype(np.float64)
        scale = (np.max(np.abs(rows), axis=1, keepdims=True) / _INT8_MAX).astype(np.float32)
        safe = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float64)  # an all-zero row sends q = 0
        # Stochastic rounding: floor(y + U[0,1)) is y's floor or ceil with E = y, so E[q * scale] = x.
        q = np.floor(rows / safe + rng.random(rows.shape))
        q = np.clip(q, -_INT8_MAX, _INT8_MAX).astype(np.int8)  # only float error can reach past the end
        return {"q": _from_rows(q, x.shape, spec.int8_scale == "row"), "s": scale.reshape(-1)}
    flat = x.reshape(-1)
    k = topk_count(flat.size, spec.topk_fraction)
    idx = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:]).astype(np.int32)
    return {"i": idx, "v": flat[idx].astype(np.float32)}


def decode_array(payload: Mapping[str, np.ndarray], shape: tuple[int, ...], spec: CompressionSpec) -> np.ndarray:
    """The float32 array of `shape` back from `encode_array`'s payload. Raises ValueError (one line) on any
    payload that `encode_array` with this spec could not have produced: wrong keys, dtypes, sizes, indices."""
    shape = tuple(int(s) for s in shape)
    size = int(np.prod(shape, dtype=np.int64))
    want = {"none": {"v"}, "fp16": {"h"}, "int8": {"q", "s"}, "topk": {"i", "v"}}[spec.codec]
    if set(payload) != want:
        raise ValueError(f"{spec.codec} payload has parts {sorted(payload)}, expected {sorted(want)}")

    def arr(key: str, dtype, n: int | None = None, shp: tuple | None = None) -> np.ndarray:
        a = payload[key]
        if not isinstance(a, np.ndarray) or a.dtype != np.dtype(dtype):
            raise ValueError(f"{spec.codec} part {key}: expected {np.dtype(dtype).name}")
        if shp is not None and a.shape != shp:
            raise ValueError(f"{spec.codec} part {key}: shape {a.shape[:4]}, expected {shp}")
        if n is not None and (a.ndim != 1 or a.size != n):
            raise ValueError(f"{spec.codec} part {key}: {a.size} values, expected {n}")
        return a

    if spec.codec == "none":
        out = arr("v", np.float32, shp=shape)
    elif spec.codec == "fp16":
        out = arr("h", np.float16, shp=shape).astype(np.float32)
    elif spec.codec == "int8":
        q = arr("q", np.int8, shp=shape)
        if np.any(q == -128):
            raise ValueError("int8 part q: -128 is outside the symmetric range")
        per_row = spec.int8_scale == "row"
        s = arr("s", np.float32, n=n_scales(shape, spec))
        if not np.all(np.isfinite(s)) or np.any(s < 0):
            raise ValueError("int8 part s: scales must be finite and >= 0")
        out = _from_rows(_row_view(q, per_row).astype(np.float32) * s[:, None], shape, per_row)
    else:
        k = topk_count(size, spec.topk_fraction)
        idx = arr("i", np.int32, n=k)
        vals = arr("v", np.float32, n=k)
        if k and (idx[0] < 0 or idx[-1] >= size or np.any(np.diff(idx) <= 0)):
            raise ValueError("topk part i: indices must be increasing and within the tensor")
        out = np.zeros(size, np.float32)
        out[idx] = vals
        out = out.reshape(shape)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{spec.codec} payload decodes to non-finite values")
    return out


def payload_nbytes(payload: Mapping[str, np.ndarray]) -> int:
    return int(sum(a.nbytes for a in payload.values()))


# -- a client's sent tensors ------------------------------------------------------------------------------------
SEP = "|"  # "<tensor>|<suffix>" on the wire; tensor names ("<module>.<part>", "head.<name>") hold no "|"


def compress(tensors: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], spec: CompressionSpec,
             rng: np.random.Generator, residual: Mapping[str, np.ndarray] | None = None
             ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(wire payload "<tensor>|<suffix>" -> array, new top-k residual) for a client's sent tensors against
    `ref`. The residual is {} except for topk: (change + residual) - what was sent, per tensor."""
    payload: dict[str, np.ndarray] = {}
    new_residual: dict[str, np.ndarray] = {}
    for name in sorted(tensors):
        if spec.codec == "none":
            parts = encode_array(tensors[name], spec, rng)
        else:
            change = np.asarray(tensors[name], np.float64) - np.asarray(ref[name], np.float32)
            if spec.codec == "topk":
                prev = (residual or {}).get(name)
                if prev is not None and prev.shape == change.shape:
                    change = change + prev
            parts = encode_array(change.astype(np.float32), spec, rng)
            if spec.codec == "topk":
                new_residual[name] = (change - decode_array(parts, change.shape, spec)).astype(np.float32)
        payload.update({f"{name}{SEP}{k}": v for k, v in parts.items()})
    return payload, new_residual


def decompress(payload: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], spec: CompressionSpec
               ) -> dict[str, np.ndarray]:
    """tensor -> float32 value: the reference plus the decoded change (none: the values as sent). Exactly the
    tensors of `ref` must be present, with the shapes of `ref`; anything else raises ValueError."""
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, value in payload.items():
        name, sep, suffix = str(key).rpartition(SEP)
        if not sep:
            raise ValueError(f"payload key {str(key)[:60]!r} names no tensor part")
        grouped.setdefault(name, {})[suffix] = value
    if set(grouped) != set(ref):
        missing, extra = sorted(set(ref) - set(grouped)), sorted(set(grouped) - set(ref))
        raise ValueError(f"compressed payload: missing {missing[:2]}, unexpected {[e[:60] for e in extra[:2]]}")
    out = {}
    for name, r in ref.items():
        r = np.asarray(r, np.float32)
        decoded = decode_array(grouped[name], r.shape, spec)
        out[name] = decoded if spec.codec == "none" else (r + decoded).astype(np.float32)
    return out


def residual_state(residual: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Client-state entries (`ef/<tensor>`) for a residual."""
    return {EF_PREFIX + k: v for k, v in residual.items()}


def residual_from_state(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k[len(EF_PREFIX):]: v for k, v in state.items() if k.startswith(EF_PREFIX)}


# -- an update: client side and server side ---------------------------------------------------------------------
def sent_reference(strategy, parts, factors, head, scale: float) -> dict[str, np.ndarray]:
    """The float32 tensors a client of LoRA scale `scale` starts from, in the names it sends (`dp.sent_tensors`):
    what the wire delivered to it, and what the server computes again from its own state."""
    from fedlora import lora
    from fedlora.protocol import sent_tensors

    return {k: v.astype(np.float32) for k, v in
            sent_tensors(strategy, parts, lora.with_scale(factors, scale), head).items()}


def client_rng(cfg, round_idx: int, client_id: int) -> np.random.Generator:
    """Stochastic rounding's randomness: per run, round and client, so a run is reproducible."""
    return np.random.default_rng([cfg.seed, round_idx, client_id, 0xC0DEC])


def compress_update(cfg, strategy, update, start_factors, start_head, store, round_idx: int
                    ) -> tuple[dict[str, np.ndarray], int, int]:
    """Client side: (wire payload, bytes, bytes of the head) for `update`, trained from (`start_factors`,
    `start_head`). top-k reads its residual from `store` (a `ClientStateStore`) before `round_idx` and saves
    the new one at `round_idx` beside the client's other state for that round."""
    from fedlora.protocol import sent_tensors

    spec = CompressionSpec.from_config(cfg)
    parts = strategy.roles(round_idx).up
    tensors = sent_tensors(strategy, parts, update.factors, update.head)
    ref = sent_reference(strategy, parts, start_factors, start_head, cfg.lora.scale(update.rank))
    state = store.load(update.client_id, before_round=round_idx + 1) if spec.codec == "topk" else {}
    payload, residual = compress(tensors, ref, spec, client_rng(cfg, round_idx, update.client_id),
                                 residual_from_state(store.load(update.client_id, before_round=round_idx))
                                 if spec.codec == "topk" else None)
    if spec.codec == "topk":
        # One file per client and round holds all its state: keep what else was saved this round (FedSA's B).
        kept = {k: v for k, v in state.items() if not k.startswith(EF_PREFIX)}
        store.save(update.client_id, round_idx, kept | residual_state(residual))
    head_bytes = sum(a.nbytes for k, a in payload.items() if k.startswith("head."))
    return payload, payload_nbytes(payload), head_bytes


def decompress_update(server, client_id: int, payload: Mapping[str, np.ndarray]):
    """Server side: (factors, head) of client `client_id` from its payload, against the server's own copy of
    what it sent the client. Raises ValueError (one line) on a payload that does not fit."""
    from fedlora.protocol import from_sent

    spec = CompressionSpec.from_config(server.cfg)
    parts = server.up_parts()
    rank = server.expected_rank(client_id)
    sent = server.sent_factors(client_id)
    ref = sent_reference(server.strategy, parts, sent, server.head, server.cfg.lora.scale(rank))
    tensors = decompress(payload, ref, spec)
    from fedlora import lora

    return from_sent(server.strategy, parts, tensors, lora.with_scale(sent, server.cfg.lora.scale(rank)), server.head)


def start_factors(trainer, down, client_id: int):
    """The factors a client's training started from: the downlink's, or FLoRA's fresh seed-derived ones."""
    from fedlora.lora import fresh_factors

    return down.factors or fresh_factors(trainer.cfg, trainer.dims, down.rank, down.round, client_id)
