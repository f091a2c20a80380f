"""Bounds on how far one client can move the global model, measured on what it sends (factors and head).

- `OwnNormBound` (federation.max_update_norm): rejects an update whose own change is too large. It reads that
  client alone, so it may run before client-level DP's clip (a rejected client contributes nothing, a function
  of its own data only).
- `MedianBound` (federation.norm_bound_factor): scales changes above a multiple of the round's median. It reads
  the other clients, so it runs only without client-level DP (there the clip is the bound) and without SecAgg.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fedlora.protocol import Update, from_sent, sent_tensors
from fedlora.round.context import RoundContext
from fedlora.round.stage import Stage


def sent_change(server, u: Update) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(now, ref): what the client sends this round and the same arrays of what it started from."""
    parts = server.up_parts()
    ref_factors, ref_head = server.reference(u)
    return (sent_tensors(server.strategy, parts, u.factors, u.head),
            sent_tensors(server.strategy, parts, ref_factors, ref_head))


def change_norm(server, u: Update) -> float:
    """L2 norm of what the client changed in what it sends (factors and head) this round."""
    now, ref = sent_change(server, u)
    return float(np.sqrt(sum(np.sum((now[k] - ref[k]) ** 2) for k in now)))


def scaled_change(server, u: Update, c: float) -> Update:
    """The update with its change (against its reference) multiplied by c."""
    now, ref = sent_change(server, u)
    factors, head = from_sent(server.strategy, server.up_parts(), {k: ref[k] + c * (now[k] - ref[k]) for k in now},
                              u.factors, u.head)
    return replace(u, factors=factors, head=head)


class OwnNormBound(Stage):
    name = "own-norm-bound"

    def run(self, server, ctx: RoundContext) -> None:
        bound = server.cfg.federation.max_update_norm
        kept = []
        for u in ctx.contributors:
            norm = ctx.norms[u.client_id] = change_norm(server, u)
            if bound is not None and norm > bound:
                ctx.rejected[u.client_id] = (f"update norm {norm:.3g} above the bound {bound:.3g} "
                                             "(federation.max_update_norm)")
            else:
                kept.append(u)
        ctx.contributors = kept


class MedianBound(Stage):
    name = "median-bound"
    reads_other_clients = True

    def run(self, server, ctx: RoundContext) -> None:
        factor = server.cfg.federation.norm_bound_factor
        if factor is None or len(ctx.contributors) < 3:  # a median of one or two is the suspect's own norm
            return
        bound = factor * float(np.median([ctx.norms[u.client_id] for u in ctx.contributors]))
        ctx.contributors = [scaled_change(server, u, bound / ctx.norms[u.client_id])
                            if ctx.norms[u.client_id] > bound > 0 else u for u in ctx.contributors]
