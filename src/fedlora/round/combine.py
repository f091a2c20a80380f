"""Stages that turn the valid contributions into what the strategy aggregates, without client-level DP:
the weighted mean's inputs, a robust center, or the secure sum."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from fedlora.protocol import from_sent, sent_tensors
from fedlora.round.context import RoundContext
from fedlora.round.stage import Stage
from fedlora.round.validate import require_enough
from fedlora.secagg import mean_update


class WeightedMean(Stage):
    """Each valid update aggregated with its (bounded) example count as weight."""

    name = "weighted-mean"

    def run(self, server, ctx: RoundContext) -> None:
        require_enough(server, ctx)
        ctx.inputs = [u.factors for u in ctx.contributors]
        ctx.weights = [float(u.num_examples) for u in ctx.contributors]


def robust_center(server, updates: list, rule: str, trim: float):
    """One update whose sent tensors are the coordinate-wise median (or trimmed mean) of the clients'.

    Only for linear methods with one rank (checked with the config): their aggregate of one update is that
    update, so aggregating the center gives the robust aggregate. Weights are ignored (as in the robust
    statistics literature: a weight is as untrusted as the values).
    """
    strategy, parts = server.strategy, server.up_parts()
    tensors = [sent_tensors(strategy, parts, u.factors, u.head) for u in updates]
    center = {}
    for k in tensors[0]:
        stack = np.stack([t[k] for t in tensors])
        if rule == "median":
            center[k] = np.median(stack, axis=0)
        else:
            cut = int(math.floor(trim * len(updates)))
            center[k] = np.sort(stack, axis=0)[cut: len(updates) - cut].mean(axis=0)
    factors, head = from_sent(strategy, parts, center, updates[0].factors, updates[0].head)
    return replace(updates[0], factors=factors, head=head)


class RobustCenter(Stage):
    """federation.aggregation = median | trimmed-mean: the coordinate-wise center is the round's one update."""

    name = "robust-center"
    reads_other_clients = True

    def run(self, server, ctx: RoundContext) -> None:
        require_enough(server, ctx)
        fed = server.cfg.federation
        if len(ctx.contributors) > 1:
            center = robust_center(server, ctx.contributors, fed.aggregation, fed.trim_fraction)
            ctx.inputs, ctx.weights, ctx.head = [center.factors], [1.0], center.head or None
            ctx.extra["aggregation"] = fed.aggregation
        else:
            ctx.inputs = [u.factors for u in ctx.contributors]
            ctx.weights = [1.0] * len(ctx.contributors)


class SecureMean(Stage):
    """Secure aggregation without client-level DP: the unmasked weighted mean is the round's one update."""

    name = "secure-mean"
    reads_other_clients = True  # it reads only the sum, but the sum is every client's

    def run(self, server, ctx: RoundContext) -> None:
        if ctx.failed is not None:
            return
        require_enough(server, ctx)
        try:
            mean = mean_update(server, ctx.summed.plan, ctx.summed.mean, ctx.summed.members)
        except ValueError as exc:
            ctx.failed = str(exc)
            return
        ctx.inputs, ctx.weights, ctx.head = [mean.factors], [1.0], mean.head or None
