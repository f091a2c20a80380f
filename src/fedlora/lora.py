"""The one place that turns a PEFT model into per-module (A, B, scale) arrays and back.

Module names are the PEFT names with the `base_model.model.` wrapper prefix removed, e.g.
`bert.encoder.layer.0.attention.self.query`, so they are stable across adapters, engines and checkpoints.
"""

from __future__ import annotations

import zlib
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from peft.tuners.lora import LoraLayer

from fedlora.strategies import LoraFactors

_PREFIX = "base_model.model."


def clean_name(name: str) -> str:
    return name.removeprefix(_PREFIX)


def lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    """Every LoRA-wrapped layer of a PEFT model, by clean module name, in model order."""
    return {clean_name(n): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """float32 (a float64 model, as in exactness tests, stays float64)."""
    t = t.detach()
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32).cpu().numpy().copy()


def get_factors(model: torch.nn.Module, adapter: str) -> dict[str, LoraFactors]:
    """Copy an adapter's factors out as float32 NumPy arrays."""
    out = {}
    for name, layer in lora_layers(model).items():
        A, B = _to_numpy(layer.lora_A[adapter].weight), _to_numpy(layer.lora_B[adapter].weight)
        out[name] = LoraFactors(A=A, B=B, scale=float(layer.scaling[adapter]))
    return out


class _ThroughFixedA(torch.nn.Module):
    """lora_A's weight as R @ A0 with A0 fixed (orthonormal rows): Fed-SB trains only the r x r core R."""

    def __init__(self, A0: np.ndarray):
        super().__init__()
        self.register_buffer("A0", torch.from_numpy(np.asarray(A0, dtype=np.float32)))

    def forward(self, R: torch.Tensor) -> torch.Tensor:
        return R @ self.A0.to(R.dtype)

    def right_inverse(self, A: torch.Tensor) -> torch.Tensor:
        return A @ self.A0.to(A.dtype).T  # exact for A in the row space of A0 (A0 A0ᵀ = I)


@contextmanager
def trained_through_core(model: torch.nn.Module, adapter: str, A0: dict[str, np.ndarray]) -> Iterator[None]:
    """While inside: every lora_A of `adapter` is R @ A0[module] with R (r x r) its only parameter (what an
    optimizer built inside trains). On exit the weight is a plain, frozen parameter again holding R @ A0, so
    evaluation, merging and PEFT's saving see an ordinary LoRA.

    torch's parametrize does this without a custom layer: the forward, Opacus-free training and every reader
    of `lora_A.weight` work unchanged."""
    from torch.nn.utils import parametrize

    layers = lora_layers(model)
    wrapped = []
    try:
        for name, layer in layers.items():
            mod = layer.lora_A[adapter]
            parametrize.register_parametrization(mod, "weight", _ThroughFixedA(A0[name]), unsafe=True)
            wrapped.append(mod)
        yield
    finally:
        for mod in wrapped:
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
            mod.weight.requires_grad_(False)


@torch.no_grad()
def set_factors(model: torch.nn.Module, adapter: str, factors: dict[str, LoraFactors]) -> None:
    """Load factors into an adapter in place. Shapes must match the adapter's rank exactly."""
    layers = lora_layers(model)
    missing = set(layers) - set(factors)
    if missing:
        raise ValueError(f"factors missing for modules: {sorted(missing)[:3]}")
    for name, layer in layers.items():
        f = factors[name]
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        if tuple(f.A.shape) != tuple(a.shape) or tuple(f.B.shape) != tuple(b.shape):
            raise ValueError(
                f"module {name}: factors of shape A{f.A.shape} B{f.B.shape} do not fit adapter {adapter!r} "
                f"(A{tuple(a.shape)} B{tuple(b.shape)})"
            )
        a.copy_(torch.as_tensor(np.asarray(f.A)))  # rounded to the adapter's own dtype (float32 unless float64)
        b.copy_(torch.as_tensor(np.asarray(f.B)))


def _head_modules(model: torch.nn.Module, adapter: str) -> dict[str, torch.nn.Module]:
    """The trainable copies PEFT keeps in `modules_to_save` (the classifier head), by clean name."""
    out = {}
    for name, module in model.named_modules():
        to_save = getattr(module, "modules_to_save", None)
        if isinstance(to_save, torch.nn.ModuleDict) and adapter in to_save:
            out[clean_name(name)] = to_save[adapter]
    return out


def head_wrappers(model: torch.nn.Module, adapter: str) -> dict[str, torch.nn.Module]:
    """PEFT's wrappers of the head (ModulesToSaveWrapper), by clean name, for those with a copy for `adapter`."""
    return {clean_name(name): module for name, module in model.named_modules()
            if isinstance(getattr(module, "modules_to_save", None), torch.nn.ModuleDict)
            and adapter in module.modules_to_save}


def get_head(model: torch.nn.Module, adapter: str) -> dict[str, np.ndarray]:
    return {
        f"{mod_name}.{p_name}": _to_numpy(p)
        for mod_name, mod in _head_modules(model, adapter).items()
        for p_name, p in mod.named_parameters()
    }


@torch.no_grad()
def set_head(model: torch.nn.Module, adapter: str, head: dict[str, np.ndarray]) -> None:
    for mod_name, mod in _head_modules(model, adapter).items():
        for p_name, p in mod.named_parameters():
            p.copy_(torch.as_tensor(np.asarray(head[f"{mod_name}.{p_name}"])))


@torch.no_grad()
def merge_base_delta(model: torch.nn.Module, deltas: dict[str, np.ndarray]) -> None:
    """Add dense deltas (d_out x d_in, the nn.Linear layout) into the frozen base weights.

    GPT-2 style Conv1D layers store the weight transposed (fan_in_fan_out), so the delta is transposed there.
    """
    from fedlora.strategies import merge_into_weight  # the layout rule, in one place

    layers = lora_layers(model)
    with torch.no_grad():
        for name, delta in deltas.items():
            layer = layers[name]
            weight = layer.get_base_layer().weight
            try:
                merged = merge_into_weight(weight.detach().float().cpu().numpy(), np.asarray(delta, dtype=np.float32),
                                           bool(getattr(layer, "fan_in_fan_out", False)))
            except ValueError as exc:
                raise ValueError(f"module {name}: {exc}") from None
            weight.copy_(torch.from_numpy(merged).to(weight.device, weight.dtype))


def module_dims(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of each LoRA-wrapped base layer, in the nn.Linear convention."""
    dims = {}
    for name, layer in lora_layers(model).items():
        dims[name] = (int(layer.out_features), int(layer.in_features))
    return dims


def seeded_A(seed: int, module: str, rank: int, d_in: int) -> np.ndarray:
    """A deterministic PEFT-style A (kaiming-uniform, a=sqrt(5)) for one module.

    Derived from (seed, module name) alone, so every client and the server build bit-identical A without
    sending it; a lower rank takes a prefix of the rows (nested ranks share one A_max).
    """
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(module.encode())) % (2**63))
    A = torch.empty(rank, d_in)
    torch.nn.init.kaiming_uniform_(A, a=5**0.5, generator=gen)
    return A.numpy()


def initial_factors(
    seed: int, dims: dict[str, tuple[int, int]], rank: int, scale: float
) -> dict[str, LoraFactors]:
    """The global starting point for a rank: seeded A, B = 0 (the PEFT init, shared by all clients)."""
    return {
        name: LoraFactors(A=seeded_A(seed, name, rank, d_in), B=np.zeros((d_out, rank), np.float32), scale=scale)
        for name, (d_out, d_in) in dims.items()
    }


def with_scale(factors: dict[str, LoraFactors], scale: float) -> dict[str, LoraFactors]:
    """Same ΔW = s·B·A expressed with another scale (folded into B), to fit an adapter's own alpha/r."""
    return {
        n: f if f.scale == scale else LoraFactors(A=f.A, B=f.B * (f.scale / scale), scale=scale)
        for n, f in factors.items()
    }


def fresh_factors(cfg, dims, rank: int, round_idx: int, client_id: int) -> dict[str, LoraFactors]:
    """A new LoRA for FLoRA: random A (own seed per round and client: stacking is exact anyway), B = 0."""
    seed = cfg.seed + 7919 * (round_idx + 1) + 104729 * (client_id + 1)
    return initial_factors(seed, dims, rank, cfg.lora.scale(rank))
