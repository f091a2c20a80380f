"""The strategy's aggregate and the commit of its result into the server's global state."""

from __future__ import annotations

import copy

import numpy as np

from fedlora.errors import RoundFailed
from fedlora.round.context import RoundContext
from fedlora.round.stage import Stage
from fedlora.round.validate import require_enough
from fedlora.strategies import WIRE_BYTES, weighted_mean


def refused_alone(strategy, contributors: list) -> dict[int, str]:
    """client -> the strategy's reason, for every update it refuses even on its own."""
    bad = {}
    for u in contributors:
        saved = copy.deepcopy(strategy.state_dict())
        try:
            strategy.aggregate([u.factors], [1.0])
        except ValueError as exc:
            bad[u.client_id] = " ".join(str(exc).split())[:300]
        finally:
            strategy.load_state_dict(saved)
    return bad


class Aggregate(Stage):
    """strategy.aggregate over the round's inputs. With one input per client, a strategy's ValueError is traced
    to the clients whose update it refuses on its own: they are rejected and the round retried."""

    name = "aggregate"

    def run(self, server, ctx: RoundContext) -> None:
        if ctx.failed is not None and not ctx.inputs:
            return
        strategy = server.strategy
        saved = copy.deepcopy(strategy.state_dict())
        per_client = len(ctx.inputs) == len(ctx.contributors) and len(ctx.inputs) > 1
        while True:
            try:
                ctx.result = strategy.aggregate(ctx.inputs, ctx.weights)
                break
            except ValueError as exc:
                strategy.load_state_dict(copy.deepcopy(saved))
                bad = refused_alone(strategy, ctx.contributors) if per_client else {}
                if not bad:
                    raise RoundFailed(f"round {ctx.round}: {strategy.name} cannot aggregate this round's "
                                      f"updates together: {exc}") from None
                for c, why in bad.items():
                    ctx.rejected[c] = f"refused by {strategy.name}: {why}"
                kept = [i for i, u in enumerate(ctx.contributors) if u.client_id not in bad]
                ctx.contributors = [ctx.contributors[i] for i in kept]
                ctx.inputs = [ctx.inputs[i] for i in kept]
                ctx.weights = [ctx.weights[i] for i in kept]
                require_enough(server, ctx)
        if ctx.head is None and len(ctx.inputs) == len(ctx.contributors) and ctx.contributors \
                and ctx.contributors[0].head:
            ctx.head = {k: weighted_mean([u.head[k] for u in ctx.contributors], ctx.weights).astype(np.float32)
                        for k in ctx.contributors[0].head}


class Commit(Stage):
    """The round's result becomes the global state: head, merged base deltas, client ranks, reports,
    accounting, the next downlinks; the round counter moves on."""

    name = "commit"

    def run(self, server, ctx: RoundContext) -> None:
        if ctx.summed is None:
            ctx.bytes_up_head = sum(sum(h.size for h in u.head.values()) * WIRE_BYTES for u in ctx.contributors)
            ctx.bytes_up = ctx.bytes_up_head + sum(server.strategy.uplink_nbytes(u.factors, ctx.round)
                                                   for u in ctx.contributors)
        if ctx.result is None:  # no aggregate this round (secure aggregation could not sum): nothing changes
            server.advance(None)
            return
        if ctx.head is not None:
            server.head = {k: np.asarray(v, np.float32) for k, v in ctx.head.items()}
        for c in ctx.contributors:
            if c.next_rank is not None and c.next_rank != c.rank:
                server.client_ranks[c.client_id] = c.next_rank
        server.mechanism.record_reports(server.privacy, ctx.contributors)
        server.mechanism.account_round()
        server.advance(ctx.result)
