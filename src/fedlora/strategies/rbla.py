"""RBLA: rank-based slot-wise averaging; slot j is averaged only over the clients that hold it."""

from __future__ import annotations

from .registry import register
from .zeropad import ZeroPad


@register("rbla")
class RBLA(ZeroPad):
    """A_g[j] = Σ_{k: r_k>j} p_k A_k[j] / c_j and B_g[:, j] likewise, so high slots are not diluted.

    Down: the prefix (A_g[:r], B_g[:, :r]). `result.slot_weights[module]` holds c_j.
    Not exact (factor averaging); linear in the sent factors.
    """

    per_slot_mean = True
