"""Merging a dense delta (d_out x d_in) into a frozen base weight, in either storage layout."""

from __future__ import annotations

import numpy as np


def merge_into_weight(W: np.ndarray, delta: np.ndarray, fan_in_fan_out: bool) -> np.ndarray:
    """Return W + delta for a weight stored as nn.Linear (d_out x d_in), or W + deltaᵀ when the layer stores
    it transposed (GPT-2 Conv1D, `fan_in_fan_out=True`: d_in x d_out). Shapes are checked, but a square
    weight cannot reveal a wrong flag: the caller must pass the layer's real layout."""
    W = np.asarray(W)
    delta = np.asarray(delta)
    update = delta.T if fan_in_fan_out else delta
    if W.shape != update.shape:
        layout = "d_in x d_out (fan_in_fan_out)" if fan_in_fan_out else "d_out x d_in"
        raise ValueError(f"merge_into_weight: weight {W.shape} does not match delta {delta.shape} laid out {layout}")
    return W + update.astype(W.dtype, copy=False)
