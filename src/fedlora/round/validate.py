"""The first stage: every reply checked against the server's own state, one client at a time.

What a client may send (modules, shapes, rank, scale, head keys, counts) comes from the server (`expected_rank`,
`dims`, `head`); anything else rejects that client with a reason and the round goes on. Nothing here reads
another client's update.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from fedlora.errors import RoundFailed
from fedlora.protocol import Update
from fedlora.round.context import RoundContext
from fedlora.round.stage import Stage

MAX_EXAMPLES = 10**9  # the largest example count a reply may claim at all


def _finite(x: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(x)))


def update_defect(server, u: Update) -> str | None:
    """Why this update must be rejected, or None: everything is compared with the server's own state."""
    if not isinstance(u.client_id, int) or not 0 <= u.client_id < len(server.client_ranks):
        return f"unknown client id {u.client_id!r}"
    rank = server.expected_rank(u.client_id)
    if u.rank != rank:
        return f"rank {u.rank} differs from the client's assigned rank {rank}"
    if isinstance(u.num_examples, bool) or not isinstance(u.num_examples, int) \
            or not 1 <= u.num_examples <= MAX_EXAMPLES:
        return f"example count {u.num_examples!r} is not an integer in 1..{MAX_EXAMPLES}"
    if set(u.factors) != set(server.dims):
        missing, extra = sorted(set(server.dims) - set(u.factors)), sorted(set(u.factors) - set(server.dims))
        return f"wrong module set (missing {missing[:2]}, unexpected {extra[:2]})"
    scale = server.cfg.lora.scale(rank)
    for name, (d_out, d_in) in server.dims.items():
        f = u.factors[name]
        if not (isinstance(f.A, np.ndarray) and isinstance(f.B, np.ndarray)) or f.A.dtype.kind != "f" \
                or f.B.dtype.kind != "f":
            return f"module {name}: factors must be float arrays"
        if f.A.ndim == 2 and f.B.ndim == 2 and f.A.shape[0] == f.B.shape[1] and f.A.shape[0] > rank:
            return f"module {name}: rank {f.A.shape[0]} above the client's rank {rank}"
        if f.A.shape != (rank, d_in) or f.B.shape != (d_out, rank):
            return f"module {name}: shapes A{f.A.shape} B{f.B.shape}, expected A{(rank, d_in)} B{(d_out, rank)}"
        if not (_finite(f.A) and _finite(f.B)):
            return f"module {name}: non-finite values"
        if not math.isclose(float(f.scale), scale, rel_tol=1e-6):
            return f"module {name}: scale {f.scale} differs from the server's {scale} for rank {rank}"
    if set(u.head) != set(server.head):
        return f"head keys {sorted(u.head)[:3]} differ from the server's {sorted(server.head)[:3]}"
    for name, h in server.head.items():
        got = u.head[name]
        if not isinstance(got, np.ndarray) or got.dtype.kind != "f" or got.shape != h.shape:
            return f"head {name}: wrong type or shape, expected float {h.shape}"
        if not _finite(got):
            return f"head {name}: non-finite values"
    if u.next_rank is not None:
        if isinstance(u.next_rank, bool) or not isinstance(u.next_rank, int) or not 1 <= u.next_rank <= rank:
            return f"next rank {u.next_rank!r} is not an integer in 1..{rank}"
        if u.next_rank != rank and not server.strategy.clients_change_rank:
            return f"next rank {u.next_rank}: {server.strategy.name} clients keep their rank"
    return None


def verified_report(server, u: Update, round_idx: int) -> dict | str | None:
    """The client's privacy report as the server verified it, or why it is refused (None: no reports)."""
    return server.mechanism.check_report(u, server.privacy.get(u.client_id), server.client_sizes[u.client_id],
                                         round_idx)


def bounded_weight(server, u: Update) -> int:
    """A client's aggregation weight: its claimed example count, never more than the server knows it holds
    (its partition size), so a crafted count cannot multiply its influence."""
    known = server.client_sizes[u.client_id] if u.client_id < len(server.client_sizes) else 1
    return max(1, min(int(u.num_examples), int(known)))


class Validate(Stage):
    """Check every reply; keep one valid update per sampled client, as the server may read it (the parts it
    sends this round; every other part is what the server sent), with its weight bounded."""

    name = "validate"

    def run(self, server, ctx: RoundContext) -> None:
        seen: set[int] = set()
        for u in ctx.updates:
            reason = update_defect(server, u)
            if reason is None and u.client_id in seen:
                reason = "a second update from this client this round"
            if reason is None and u.client_id not in ctx.sampled:
                reason = "this client was not sampled this round"
            report = verified_report(server, u, ctx.round) if reason is None else None
            if isinstance(report, str):
                reason = report
            if reason:
                ctx.rejected[u.client_id if isinstance(u.client_id, int) else -1] = reason
                continue
            seen.add(u.client_id)
            ctx.contributors.append(replace(server.as_sent(u), num_examples=bounded_weight(server, u),
                                            privacy=report if report is not None else {}))


class CheckMembers(Stage):
    """Secure aggregation: the sum's members checked by their metadata (id, rank, report). A member that does
    not check out cannot be taken out of the sum: the sum is not used (`ctx.failed`)."""

    name = "check-members"

    def run(self, server, ctx: RoundContext) -> None:
        if ctx.summed is None:
            return
        members, bad, checked = ctx.summed.members, {}, []
        for u in members:
            ok_id = isinstance(u.client_id, int) and 0 <= u.client_id < len(server.client_ranks)
            rank = server.expected_rank(u.client_id) if ok_id else None
            why = ("unknown client id" if not ok_id else
                   "not sampled this round" if u.client_id not in ctx.sampled else
                   f"rank {u.rank} differs from its assigned rank {rank}" if u.rank != rank else None)
            report = verified_report(server, u, ctx.round) if why is None else None
            if isinstance(report, str):
                why = report
            if why:
                bad[u.client_id] = why
            else:
                checked.append(replace(u, privacy=report if report is not None else {}))
        if len({u.client_id for u in members}) != len(members):
            bad[-1] = "a client appears twice in the sum"
        if bad:
            ctx.failed = ("secure aggregation: a summed client does not check out ("
                          + "; ".join(f"client {c}: {r}" for c, r in sorted(bad.items())) + ")")
            ctx.rejected.update(bad)
            return
        ctx.contributors = checked


def require_enough(server, ctx: RoundContext) -> None:
    """federation.min_clients valid updates, or the round fails (not under client-level DP: its release is
    defined for any number of clients, and failing would reveal how many took part)."""
    if len(ctx.contributors) < server.cfg.federation.min_clients:
        why = "; ".join(f"client {c}: {r}" for c, r in sorted(ctx.rejected.items()))
        raise RoundFailed(
            f"round {ctx.round}: only {len(ctx.contributors)} valid updates, fewer than federation.min_clients="
            f"{server.cfg.federation.min_clients}" + (f" (rejected: {why})" if why else ""))
