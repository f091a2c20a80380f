"""Differential privacy for fedlora clients.

- :mod:`.accountant`: per-client RDP/PRV accountant (Opacus), sigma calibration, budget check, validation.
- :mod:`.dpsgd`: sample-level DP-SGD on a PEFT model with Opacus (``private_training`` context manager).
- :mod:`.client_dp`: client-level DP (DP-FedAvg) clipping and noise on NumPy updates.
"""

from .accountant import ClientAccountant, calibrate_noise_multiplier, validate_privacy_params, would_exceed
from .client_dp import clip_update, gaussian_noise, update_norm
from .dpsgd import modules_to_hook, noise_only_step, poisson_batches, private_training

__all__ = [
    "ClientAccountant",
    "calibrate_noise_multiplier",
    "clip_update",
    "gaussian_noise",
    "modules_to_hook",
    "noise_only_step",
    "poisson_batches",
    "private_training",
    "update_norm",
    "validate_privacy_params",
    "would_exceed",
]
