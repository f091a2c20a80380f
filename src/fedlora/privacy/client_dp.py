"""Client-level DP (DP-FedAvg) primitives on NumPy updates: joint clipping and Gaussian noise.

Pure NumPy on the arrays a client sends (for FFA-LoRA: the B factors and the head). Written by hand because
Opacus works on per-example gradients of a torch model, not on federated updates. The protocol that uses
them (where the clip is measured, where the noise goes, the fixed denominator, accounting) is
`fedlora.round.client_dp` (with `fedlora.dp.ClientLevelDP` for sampling and accounting).
"""

from __future__ import annotations

import math

import numpy as np

from .accountant import validate_privacy_params

__all__ = ["clip_update", "gaussian_noise", "noisy_release", "update_norm"]


def update_norm(tensors: dict[str, np.ndarray]) -> float:
    """Joint L2 norm over every array sent (float64 accumulation)."""
    total = 0.0
    for name, t in tensors.items():
        a = np.asarray(t, dtype=np.float64)
        if not np.all(np.isfinite(a)):
            raise ValueError(f"client update '{name}' has non-finite values")
        total += float(np.dot(a.ravel(), a.ravel()))
    return math.sqrt(total)


def clip_update(tensors: dict[str, np.ndarray], clip: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale the whole update so its joint L2 norm is at most ``clip``; returns (clipped, norm before)."""
    validate_privacy_params(clip=clip)
    norm = update_norm(tensors)
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    clipped = {k: (np.asarray(v) * factor).astype(np.asarray(v).dtype, copy=False) for k, v in tensors.items()}
    return clipped, norm


def gaussian_noise(tensors: dict[str, np.ndarray], std: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Add i.i.d. N(0, std^2) to every coordinate; dtypes are kept (noise drawn in float64)."""
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"noise std must be a finite number >= 0, got {std!r}")
    out = {}
    for k, v in tensors.items():
        a = np.asarray(v)
        out[k] = (a + rng.normal(0.0, std, size=a.shape)).astype(a.dtype, copy=False)
    return out


def noisy_release(clipped_sum: dict[str, np.ndarray], std: float, divisors: dict[str, np.ndarray | float],
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """(Σ clipped contributions + N(0, std²) on every coordinate) / divisor, float64. The divisor of a coordinate
    is the fixed expected number of clients that hold it (never the round's count), so the release's sensitivity
    to one client is clip / divisor whatever the round's size."""
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"noise std must be a finite number >= 0, got {std!r}")
    out = {}
    for k, v in clipped_sum.items():
        a = np.asarray(v, np.float64)
        out[k] = (a + rng.normal(0.0, std, size=a.shape)) / divisors[k]
    return out
