"""Client-level DP (DP-FedAvg): clip each client's whole update, add Gaussian noise to the sum.

Pure NumPy on the arrays a client sends (for FFA-LoRA: the B factors and the head). Written by hand
because Opacus works on per-example gradients of a torch model, not on federated updates.

Protocol: every sampled client clips its update to joint L2 norm S (:func:`clip_update`); the server sums
the m clipped updates, adds N(0, (sigma*S)^2) per coordinate to the *sum* and divides by m. The noise on the
mean therefore has std sigma*S/m (:func:`client_dp_noise_std`). Use a fixed m (the configured
clients_per_round) and uniform weights: data-size weights would let one client's influence exceed S.
Accounting uses the same :class:`~fedlora.privacy.accountant.ClientAccountant` with
``sample_rate = clients_per_round / num_clients`` and one step per round.
"""

from __future__ import annotations

import math

import numpy as np

from .accountant import validate_privacy_params

__all__ = ["add_gaussian_noise", "clip_update", "client_dp_noise_std", "client_sample_rate", "update_norm"]


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


def add_gaussian_noise(tensors: dict[str, np.ndarray], std: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Add i.i.d. N(0, std^2) to every coordinate; dtypes are kept (noise drawn in float64)."""
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"noise std must be a finite number >= 0, got {std!r}")
    out = {}
    for k, v in tensors.items():
        a = np.asarray(v)
        out[k] = (a + rng.normal(0.0, std, size=a.shape)).astype(a.dtype, copy=False)
    return out


def client_dp_noise_std(noise_multiplier: float, clip: float, num_clients: int) -> float:
    """Std of the noise on the *mean* of ``num_clients`` clipped updates: sigma*S on the sum, divided by m."""
    validate_privacy_params(clip=clip, noise_multiplier=noise_multiplier)
    if int(num_clients) != num_clients or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    return noise_multiplier * clip / num_clients


def client_sample_rate(clients_per_round: int, num_clients: int) -> float:
    """Accountant sample rate for client-level DP: q = clients_per_round / num_clients."""
    if not (1 <= clients_per_round <= num_clients):
        raise ValueError(f"need 1 <= clients_per_round <= num_clients, got {clients_per_round}, {num_clients}")
    return clients_per_round / num_clients
