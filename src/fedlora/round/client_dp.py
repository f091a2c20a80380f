"""Client-level DP (DP-FedAvg) as a stage of the round: one implementation for plain rounds and for secure
aggregation.

Fixed coordinates: every client's change (what it sends minus what it was sent) is expressed at the federation's
widest rank r_max and one scale: B times c_k = the strategy's contribution scale of rank r_k against r_max, every
slot axis padded to r_max. Neither the width nor c_k depends on who was sampled.

Release: G + (Σ_k clip_S(Δ_k) + N(0, σ²S²)) / m, where G is the global adapter the round started from (at
r_max, in the same coordinates), the noise is drawn once on every coordinate (all r_max slots and the head) in
every round, and m is the fixed expected number of clients: q·K, or per slot m_j = q·#{k: r_k > j} for methods
whose mean is per slot (RBLA). Adding or removing one client moves the release by at most S/m (S/m_j on slot j);
the noise std on every released coordinate is σS/m (σS/m_j). The strategy then aggregates the release as the
round's one update (post-processing). Under SecAgg each client clips its own change in these coordinates before
masking (`fedlora.secagg.summand`), and the stage reads Σ_k clip_S(Δ_k) from the unmasked sum instead.
"""

from __future__ import annotations

import numpy as np

from fedlora.privacy.client_dp import clip_update, noisy_release
from fedlora.protocol import contribution_coef, fixed_change, from_sent, padded_shape, sent_tensors, slot_axes
from fedlora.round.context import RoundContext
from fedlora.round.stage import Stage


def layout(server) -> dict[str, tuple[int, ...]]:
    """name -> shape of the release: every sent part at r_max, then the head."""
    ref = sent_tensors(server.strategy, server.up_parts(), server.global_factors(), server.head)
    return {k: padded_shape(k, a.shape, server.r_max) for k, a in ref.items()}


def divisors(server, shapes: dict[str, tuple[int, ...]], q: float) -> dict[str, np.ndarray | float]:
    """The fixed expected number of clients behind each coordinate (see the module)."""
    ranks = np.asarray(server.client_ranks)
    m = q * len(ranks)
    if not server.strategy.per_slot_mean:
        return {k: m for k in shapes}
    per_slot = q * (ranks[None, :] > np.arange(server.r_max)[:, None]).sum(axis=1)
    out: dict[str, np.ndarray | float] = {}
    for k, shape in shapes.items():
        axes = slot_axes(k)
        if not axes:
            out[k] = m
            continue
        view = [1] * len(shape)
        view[axes[0]] = server.r_max
        out[k] = per_slot.reshape(view)  # per-slot methods have one slot axis per part (A rows, B columns)
    return out


def client_change(server, u) -> dict[str, np.ndarray]:
    """Δ_k in the fixed coordinates (the server's half of what `secagg.summand` does on a client)."""
    strategy, width = server.strategy, server.r_max
    c = contribution_coef(strategy, server.cfg.lora.scale, u.rank, width)
    return fixed_change(strategy, server.up_parts(), (u.factors, u.head), server.reference(u), c, width)


class ClientDPRelease(Stage):
    name = "client-dp"

    def run(self, server, ctx: RoundContext) -> None:
        mech, clip = server.mechanism, server.cfg.privacy.clip
        shapes = layout(server)
        total = {k: np.zeros(s) for k, s in shapes.items()}
        if ctx.summed is not None and ctx.failed is None:
            n = len(ctx.summed.members)  # uniform weights: the unmasked mean times n is the sum of clipped changes
            for k, a in ctx.summed.mean.items():
                total[k] = n * np.asarray(a, np.float64)
        elif ctx.summed is None:
            for u in ctx.contributors:
                clipped, ctx.norms[u.client_id] = clip_update(client_change(server, u), clip)
                for k in total:
                    total[k] += clipped[k]
        else:  # a sum that cannot be used: the release is noise only, and the round is accounted
            ctx.contributors = []
        release = ctx.release = noisy_release(total, mech.sigma * clip, divisors(server, shapes, mech.q),
                                              mech.noise_rng)
        ref = sent_tensors(server.strategy, server.up_parts(), server.global_factors(), server.head)
        factors, head = from_sent(server.strategy, server.up_parts(), {k: ref[k] + release[k] for k in ref},
                                  server.global_factors(), server.head)
        ctx.inputs, ctx.weights = [factors], [1.0]
        ctx.head = head if head else None
        ctx.extra.update(clip_norms={str(c): v for c, v in ctx.norms.items()}, noise_placement="sum",
                         expected_clients=mech.expected_clients(), released_width=server.r_max)

