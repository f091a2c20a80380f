"""Secure aggregation (`privacy.secure_aggregation = true`): the server learns only the weighted sum of what the
round's clients send, never one client's upload. Engine-neutral half: what a client sums, what the server makes
of the sum, and the in-process engine's stand-in for the protocol. The Flower protocol is
`fedlora.engines.flower_secagg`.

Design decision (Flower 1.42). Flower's SecAgg+ server side, `SecAggPlusWorkflow`, is written for the legacy
strategy API: its `__call__` wants a `LegacyContext` and asks a legacy `Strategy` for `configure_fit` /
`aggregate_fit`. fedlora's own loop (`Run.loop` over `FlowerTransport`) keeps the round; it calls the workflow's
four public stage methods (setup, share keys, collect masked vectors, unmask) itself, on the transport's Grid,
with a stand-in strategy that hands each node its fedlora instruction and receives the unmasked sum (the only
aggregate it ever sees). The client side is Flower's `secaggplus_mod` unchanged, wrapped so that it only sees
SecAgg+ messages. Key agreement, Shamir sharing, masking, quantization and unmasking are all Flower's code;
fedlora writes no cryptography. What fedlora adds is which vector is summed and how the server reads the sum.

What is summed. Strategies whose aggregate is a weighted sum of what clients send (`Strategy.secure_sum`,
by default the same as `linear`: ffa, fedit, zeropad, rbla, fedsvd, rolora, fedsa, fedsb) run under SecAgg; the
others are refused in one line. Client k sends c_k·pad(X_k) for every part it sends this round, padded to the
round's widest rank W, and its head, where c_k is the strategy's `contribution_scales` (FFA with mixed ranks:
s_k / s_W), weighted by
its example count w_k (SecAgg+ multiplies by w_k / max_weight and also sums the weights). The server gets
M = Σ w_k c_k pad(X_k) / Σ w_k, divides RBLA's slot j by the share of the weight that holds it (it knows
the ranks and weights of the clients that took part), and hands the strategy M as the one update of the round.
For these methods that is the same aggregate as the plain one, up to SecAgg+'s quantization (values clipped to
±privacy.secagg_clip, 2**privacy.secagg_bits levels, stochastic rounding).

What it costs and what it does not do. Masked values travel as int64 (8 bytes, twice float32), plus keys and
shares, over three extra round trips. The server cannot bound or reject one client's update (norm bounds, a
strategy refusing one client): SecAgg protects clients from the server, not the server from a client. Example
counts (weights) and the clients' losses travel in the clear. Compression: SecAgg+ quantizes to its own
integer field, so federation.compression must be none.

DP. With privacy.mode=sample each client's upload is already (epsilon, delta)-DP towards everyone, the server
included; SecAgg adds that the server sees only the sum. With privacy.mode=client (DP-FedAvg) each client clips
its own change in client-level DP's fixed coordinates (the federation's widest rank, c_k against it, to
privacy.clip) before it enters the sum, weights are uniform, and the server's client-DP stage
(`fedlora.round.client_dp`, the same code as without SecAgg) adds N(0, sigma^2 S^2) once to every coordinate of
the sum and divides by the fixed expected number of clients. The client-level (epsilon, delta) guarantee then
holds for everything the server releases (downlinks, the model), against other clients and anyone downstream;
the server itself sees the sum of the clipped changes before its noise, never an individual update, so towards
the server the protection is SecAgg's (one sum over the round's clients), not DP. Noise that even the server
never sees removed would need each client to add its share (distributed DP); fedlora does not do that.

Security note on Flower 1.42: its `pseudo_rand_gen` seeds NumPy's RandomState with a 32-bit fold of the
32-byte shared secret, so a mask has 2**32 possible values; a server able to try them all could strip a
client's private mask. fedlora uses Flower's implementation as it is; this is Flower's to fix.

The in-process engine (`secure_mean`) runs the same arithmetic without the masks (which cancel exactly modulo
2**32): weight quantization, Flower's `quantize` (clip, stochastic rounding), the integer sum modulo 2**32,
Flower's `dequantize` and the offset, so runs with and without SecAgg can be compared on one machine.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from fedlora.protocol import (
    SummedRound, Update, contribution, contribution_coef, fixed_change, from_sent, pad_to, slot_axes,
)
from fedlora.strategies import LoraFactors
from fedlora.strategies.types import part_shape
from fedlora.strategies.common import at_scale

MODULUS = 2**32  # SecAgg+'s mask modulus (Flower's default and maximum)

# Why a method cannot run under SecAgg, for the one-line refusal (fallback: the generic reason).
_WHY = {
    "hetlora": "its weights are the clients' update norms, which the server would have to read one by one",
    "flora": "it stacks the clients' factors side by side instead of adding them",
    "flexlora": "it re-factors each client's product B·A, a non-linear function of what each client sends",
    "fedex": "its residual term needs each client's factors, not their sum",
    "lora-fair": "its correction reads the clients' factors one by one",
}


def config_refusal(cfg, strategy) -> str | None:
    """Why this config cannot run with privacy.secure_aggregation (one line), or None."""
    name = strategy.name or cfg.strategy.name
    summable = getattr(strategy, "secure_sum", None)
    if summable is None:
        summable = strategy.linear
    where = "privacy.secure_aggregation"
    if not summable:
        why = _WHY.get(name, "its aggregate is not a weighted sum of what clients send")
        return f"{where} needs a method whose aggregate is a sum of the uploads; {name!r} is not: {why}"
    if cfg.federation.compression != "none":
        return (f"{where} quantizes the uploads itself (its own integer field, summed under masks): use "
                f"federation.compression=none, not {cfg.federation.compression}")
    if cfg.federation.aggregation != "mean":
        return f"{where}: federation.aggregation={cfg.federation.aggregation} reads individual updates; use mean"
    if cfg.federation.per_round() < 2:
        return f"{where} needs at least 2 clients per round (a sum of one is that client's update)"
    return None


@dataclass(frozen=True)
class Plan:
    """A round's SecAgg parameters, fixed by the server before clients train."""

    width: int  # the widest rank among the round's clients: every client pads to it
    coefs: dict[int, float]  # client -> c_k, the factor its B enters the aggregate with
    max_weight: float  # weights (example counts) are clamped to it: SecAgg+ divides by it
    clip: float
    bits: int
    dp_clip: float | None = None  # privacy.mode=client: each client clips its change to this before summing

    @property
    def quantization_range(self) -> int:
        return 2**self.bits


def plan(server, clients: list[int]) -> Plan:
    """The round's parameters. Under client-level DP they are the fixed coordinates of
    `fedlora.round.client_dp` (the federation's widest rank, c_k against it, uniform weights, each change
    clipped on its client): nothing in them depends on who was sampled."""
    cfg = server.cfg
    ranks = [server.expected_rank(c) for c in clients]
    if cfg.privacy.mode == "client":
        coefs = {c: contribution_coef(server.strategy, cfg.lora.scale, r, server.r_max) for c, r in zip(clients, ranks)}
        return Plan(width=server.r_max, coefs=coefs, max_weight=1.0, clip=cfg.privacy.secagg_clip,
                    bits=cfg.privacy.secagg_bits, dp_clip=cfg.privacy.clip)
    scales = server.strategy.contribution_scales(ranks, [cfg.lora.scale(r) for r in ranks])
    return Plan(width=max(ranks), coefs={c: float(f) for c, f in zip(clients, scales)},
                max_weight=float(max(server.client_sizes)), clip=cfg.privacy.secagg_clip, bits=cfg.privacy.secagg_bits)


def layout(parts, dims: dict[str, tuple[int, int]], head: dict[str, tuple[int, ...]],
           width: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of the summed vector's arrays, in order: every sent part of every module at `width`, then
    the head. Client and server derive it from the same config."""
    out = [(f"{m}.{p}", part_shape(p, width, d_out, d_in)) for m, (d_out, d_in) in sorted(dims.items())
           for p in parts]
    return out + [(f"head.{k}", tuple(shape)) for k, shape in sorted(head.items())]


def server_layout(server, width: int) -> list[tuple[str, tuple[int, ...]]]:
    return layout(server.up_parts(), server.dims, {k: h.shape for k, h in server.head.items()}, width)


def summand(strategy, parts, update, names: list[tuple[str, tuple[int, ...]]], coef: float,
            start: tuple | None = None, dp_clip: float | None = None) -> list[np.ndarray]:
    """Client side: the arrays a client adds to the secure sum, in `names` order. Without client-level DP: its
    sent parts padded to the round's width (B times `coef`), then its head. With `dp_clip` (client-level DP):
    its change against `start` (the factors and head it started from) in the fixed coordinates, clipped to L2
    norm `dp_clip` (what the server's client-DP stage does without SecAgg: `fedlora.round.client_dp`)."""
    width = max((s[i] for n, s in names for i in slot_axes(n)), default=0)
    if dp_clip is not None:
        from fedlora.privacy.client_dp import clip_update  # here: importing fedlora.privacy loads Opacus and torch

        now = fixed_change(strategy, parts, (update.factors, update.head), start, coef, width)
        now, _ = clip_update(now, dp_clip)
    else:
        now = contribution(strategy, parts, update.factors, update.head, coef)
    if set(now) != {n for n, _ in names}:
        raise ValueError(f"secure aggregation: the update's tensors {sorted(now)[:2]} do not fit the round's layout")
    return [pad_to(now[n], shape) for n, shape in names]


def mean_update(server, the_plan: Plan, mean: dict[str, np.ndarray], members: list):
    """Server side: the Update the strategy aggregates, from the unmasked weighted mean (flat by name at
    `the_plan.width`, as `summed_round` checked it: the round's layout, finite values) and the members whose
    uploads it sums."""
    cfg = server.cfg
    widest = max(members, key=lambda u: u.rank)
    width = widest.rank
    weights = np.asarray([float(u.num_examples) for u in members])
    if server.strategy.per_slot_mean:  # RBLA: slot j over the clients that hold it, not over all of them
        held = np.asarray([[u.rank > j for u in members] for j in range(width)], float) @ weights
        per_slot = weights.sum() / np.maximum(held, 1e-300)
    parts = server.up_parts()
    sent: dict[str, np.ndarray] = {}
    for n, a in mean.items():
        if n.startswith("head."):
            sent[n] = a
            continue
        a = a[tuple(slice(0, width) if i in slot_axes(n) else slice(None) for i in range(a.ndim))]
        if server.strategy.per_slot_mean:
            a = a * (per_slot[None, :] if n.endswith(".B") else per_slot[:, None])
        sent[n] = a
    # B entered as c_k·B_k, c_k relative to the plan's widest rank W: the mean is in W's scale; the strategy gets
    # it in the widest member's (the same when W's client took part, or when every c_k is 1).
    coefs_one = all(abs(c - 1.0) < 1e-12 for c in the_plan.coefs.values())
    s_mean = cfg.lora.scale(width if coefs_one else the_plan.width)
    ref = {m: LoraFactors(A=f.A, B=f.B, scale=s_mean) for m, f in server.sent_factors(widest.client_id).items()}
    ref = {m: LoraFactors(A=f.A[:width], B=f.B[:, :width], scale=s_mean) for m, f in ref.items()}
    factors, head = from_sent(server.strategy, parts, sent, ref, server.head)
    factors = {m: at_scale(LoraFactors(A=f.A, B=f.B, scale=s_mean), cfg.lora.scale(width)) for m, f in factors.items()}
    return Update(client_id=widest.client_id, rank=width, factors=factors, head=head,
                  num_examples=int(weights.sum()), train_loss=float(np.mean([u.train_loss for u in members])),
                  steps=0, samples=0, train_s=0.0)


# -- the in-process engine's stand-in: the same arithmetic, no masks ---------------------------------------------
def secure_mean(summands: list[list[np.ndarray]], weights: list[float], the_plan: Plan,
                rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Σ w_k x_k / Σ w_k as SecAgg+ computes it (flwr's client mod and server workflow), without masks: each
    weight quantized to round(w / max_weight · Q) / Q, the weighted arrays clipped and stochastically rounded by
    Flower's `quantize`, summed modulo 2**32 with the weights, dequantized with Flower's `dequantize`, the
    per-client offset removed and divided by the summed weights. The masks cancel exactly modulo 2**32, so this
    is the protocol's result (up to the rounding's randomness)."""
    # Flower's stochastic rounding draws from NumPy's global generator: seeded from `rng` for this call and put
    # back afterwards, so the caller's global random state is not touched.
    saved = np.random.get_state()
    if rng is not None:
        np.random.seed(int(rng.integers(2**32)))
    try:
        return _secure_mean(summands, weights, the_plan)
    finally:
        np.random.set_state(saved)


def _secure_mean(summands: list[list[np.ndarray]], weights: list[float], the_plan: Plan) -> list[np.ndarray]:
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_combine, factor_extract, parameters_addition, parameters_mod, parameters_multiply,
    )
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    Q = the_plan.quantization_range
    total = None
    for x, w in zip(summands, weights):
        q_ratio = round(min(float(w), the_plan.max_weight) / the_plan.max_weight * Q)
        quantized = quantize(parameters_multiply(x, q_ratio / Q), the_plan.clip, Q)
        vec = [a.astype(np.int64) for a in factor_combine(q_ratio, quantized)]
        total = vec if total is None else parameters_addition(total, vec)
    total = parameters_mod(total, MODULUS)
    q_total, sums = factor_extract(total)
    out = dequantize(sums, the_plan.clip, Q)
    offset = -(len(summands) - 1) * the_plan.clip
    return [(a + offset) * (Q / int(q_total)) for a in out]


def clipped_values(arrays: list[np.ndarray], weight: float, the_plan: Plan) -> int:
    """How many of a client's weighted values SecAgg+ will clip (reported: they bias the sum)."""
    r = min(float(weight), the_plan.max_weight) / the_plan.max_weight
    return int(sum(np.count_nonzero(np.abs(a * r) > the_plan.clip) for a in arrays))


def in_process_round(server, updates: list, rng: np.random.Generator) -> "SummedRound | str":
    """The in-process engine's secure round: the updates' sum as SecAgg+ computes it (`secure_mean`), their
    metadata, and the bytes the protocol would upload; or why there is no sum (fewer than 2 updates)."""
    updates = sorted(updates, key=lambda u: u.client_id)
    if len(updates) < 2:
        return f"secure aggregation needs 2 clients, {len(updates)} sent an update"
    the_plan = plan(server, [u.client_id for u in updates])
    names = server_layout(server, the_plan.width)
    summands = [summand(server.strategy, server.up_parts(), u, names, the_plan.coefs[u.client_id],
                        (server.sent_factors(u.client_id), server.head), the_plan.dp_clip) for u in updates]
    weights = [1.0 if the_plan.dp_clip is not None else max(1.0, min(float(u.num_examples), the_plan.max_weight))
               for u in updates]
    mean = secure_mean(summands, weights, the_plan, rng)
    members = [replace(u, factors={}, head={}, num_examples=int(w)) for u, w in zip(updates, weights)]
    values = sum(int(np.prod(shape)) for _, shape in names)
    head = sum(int(np.prod(shape)) for n, shape in names if n.startswith("head."))
    # What the protocol would upload: each member's masked vector and weight (int64), keys and shares aside.
    extra = {"secure_aggregation": True, "bytes_up": 8 * (values + 1) * len(members),
             "bytes_up_head": 8 * head * len(members),
             "secagg_clipped": sum(clipped_values(x, w, the_plan) for x, w in zip(summands, weights))}
    return summed_round(server, the_plan, mean, members, extra)


def summed_round(server, the_plan: Plan, arrays: list[np.ndarray], members: list, extra: dict | None = None) -> SummedRound:
    """What the server received, checked: the unmasked mean must have the round's layout and finite values
    (ValueError otherwise: the sum cannot be used)."""
    names = server_layout(server, the_plan.width)
    if len(arrays) != len(names) or any(np.shape(a) != s for a, (_, s) in zip(arrays, names)):
        raise ValueError("secure aggregation: the unmasked sum does not have the round's layout")
    if not all(np.all(np.isfinite(a)) for a in arrays):
        raise ValueError("secure aggregation: the unmasked sum has non-finite values")
    mean = {n: np.asarray(a, np.float64) for (n, _), a in zip(names, arrays)}
    return SummedRound(mean, members, dict(extra or {}), plan=the_plan)

