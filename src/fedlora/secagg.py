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
its own change (in the aggregate's coordinates, to privacy.clip) before it enters the sum, weights are uniform,
and the server adds N(0, sigma^2 S^2) once to the unmasked sum of clipped changes and divides by the expected
number of clients, exactly as without SecAgg (`dp.ClientLevelDP`). The client-level (epsilon, delta) guarantee then
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

from dataclasses import dataclass, field

import numpy as np

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
    name = cfg.strategy.name
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
    cfg = server.cfg
    ranks = [server.expected_rank(c) for c in clients]
    coefs = server.strategy.contribution_scales(ranks, [cfg.lora.scale(r) for r in ranks])
    dp = cfg.privacy.mode == "client"  # DP-FedAvg: uniform weights, each change clipped on its client
    return Plan(width=max(ranks), coefs={c: float(f) for c, f in zip(clients, coefs)},
                max_weight=1.0 if dp else float(max(server.client_sizes)), clip=cfg.privacy.secagg_clip,
                bits=cfg.privacy.secagg_bits, dp_clip=cfg.privacy.clip if dp else None)


def layout(parts, dims: dict[str, tuple[int, int]], head: dict[str, tuple[int, ...]],
           width: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of the summed vector's arrays, in order: every sent part of every module at `width`, then
    the head. Client and server derive it from the same config."""
    from fedlora.strategies.base import part_shape

    out = [(f"{m}.{p}", part_shape(p, width, d_out, d_in)) for m, (d_out, d_in) in sorted(dims.items())
           for p in parts]
    return out + [(f"head.{k}", tuple(shape)) for k, shape in sorted(head.items())]


def server_layout(server, width: int) -> list[tuple[str, tuple[int, ...]]]:
    return layout(server.up_parts(), server.dims, {k: h.shape for k, h in server.head.items()}, width)


def _pad(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    out = np.zeros(shape, np.float64)
    out[tuple(slice(0, s) for s in x.shape)] = x
    return out


def contributions(strategy, parts, factors, head, coef: float) -> dict[str, np.ndarray]:
    """The sent tensors in the aggregate's coordinates: B times the client's c_k, A, R and the head as sent."""
    from fedlora.dp import sent_tensors

    return {n: a * (coef if n.endswith(".B") and not n.startswith("head.") else 1.0)
            for n, a in sent_tensors(strategy, parts, factors, head).items()}


def summand(strategy, parts, update, names: list[tuple[str, tuple[int, ...]]], coef: float,
            start: tuple | None = None, dp_clip: float | None = None) -> list[np.ndarray]:
    """Client side: the arrays a client adds to the secure sum, in `names` order: its sent parts padded to the
    round's width (B times `coef`), then its head. With `dp_clip` (client-level DP) the change against `start`
    (the factors and head the client started from) is clipped to L2 norm `dp_clip` first, in these coordinates,
    as the server does without SecAgg (dp.ClientLevelDP)."""
    now = contributions(strategy, parts, update.factors, update.head, coef)
    if set(now) != {n for n, _ in names}:
        raise ValueError(f"secure aggregation: the update's tensors {sorted(now)[:2]} do not fit the round's layout")
    if dp_clip is not None:
        from fedlora.privacy.client_dp import clip_update

        ref = contributions(strategy, parts, start[0], start[1], coef)
        clipped, _ = clip_update({k: now[k] - ref[k] for k in now}, dp_clip)
        now = {k: ref[k] + clipped[k] for k in now}
    return [_pad(now[n], shape) for n, shape in names]


def noised_mean(server, the_plan: Plan, arrays: list[np.ndarray], members: list) -> list[np.ndarray]:
    """Client-level DP on the unmasked mean of clipped uploads (uniform weights): the sum of the clipped changes
    gets N(0, sigma^2 S^2) once and is divided by the fixed expected number of clients (per slot for RBLA), as
    `dp.ClientLevelDP` does for a plain round; returned as the mean the strategy then reads."""
    from fedlora.privacy.client_dp import gaussian_noise

    names = server_layout(server, the_plan.width)
    n = len(members)
    refs = {name: np.zeros(shape) for name, shape in names}
    for u in members:  # what each member started from, in the same coordinates (the server's own state)
        ref = contributions(server.strategy, server.up_parts(), server.sent_factors(u.client_id), server.head,
                            the_plan.coefs[u.client_id])
        for name, shape in names:
            refs[name] += _pad(ref[name], shape)
    changes = {name: n * np.asarray(a, np.float64) - refs[name] for (name, _), a in zip(names, arrays)}
    mech = server.mechanism
    rng = np.random.default_rng([server.cfg.seed, server.round + 1, 99])  # as dp.ClientLevelDP.prepare
    noisy = gaussian_noise(changes, mech.sigma * the_plan.dp_clip, rng)
    spread = mech._spread(server, members)  # D_j / m_j: the strategy's mean over D_j becomes the sum over m_j
    return [(refs[name] + spread(name, shape) * noisy[name]) / n for name, shape in names]


@dataclass
class SummedRound:
    """What the server receives under SecAgg: the weighted mean of the members' uploads (never one upload) and
    each member's metadata (id, rank, weight, loss, privacy report; no factors)."""

    mean: "object"  # fedlora.client.Update at the widest member's rank: the one update the strategy aggregates
    members: list = field(default_factory=list)  # fedlora.client.Update with factors = {} and head = {}
    extra: dict = field(default_factory=dict)


def mean_update(server, the_plan: Plan, arrays: list[np.ndarray], members: list):
    """Server side: the Update the strategy aggregates, from the unmasked weighted mean `arrays` (layout at
    `the_plan.width`) and the members whose uploads it sums."""
    from fedlora import lora
    from fedlora.client import Update
    from fedlora.dp import from_sent
    from fedlora.strategies import LoraFactors

    cfg = server.cfg
    names = server_layout(server, the_plan.width)
    if len(arrays) != len(names) or any(np.shape(a) != s for a, (_, s) in zip(arrays, names)):
        raise ValueError("secure aggregation: the unmasked sum does not have the round's layout")
    if the_plan.dp_clip is not None:
        arrays = noised_mean(server, the_plan, arrays, members)
    mean = {n: np.asarray(a, np.float64) for (n, _), a in zip(names, arrays)}
    if not all(np.all(np.isfinite(a)) for a in mean.values()):
        raise ValueError("secure aggregation: the unmasked sum has non-finite values")
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
        a = a[tuple(slice(0, width) if i in _rank_axes(n) else slice(None) for i in range(a.ndim))]
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
    factors = lora.with_scale({m: LoraFactors(A=f.A, B=f.B, scale=s_mean) for m, f in factors.items()},
                              cfg.lora.scale(width))
    return Update(client_id=widest.client_id, rank=width, factors=factors, head=head,
                  num_examples=int(weights.sum()), train_loss=float(np.mean([u.train_loss for u in members])),
                  steps=0, samples=0, train_s=0.0)


def _rank_axes(name: str) -> tuple[int, ...]:
    """The axes of a part that run over LoRA slots: A's rows, B's columns, both of R's."""
    part = name.rsplit(".", 1)[1]
    return {"A": (0,), "B": (1,), "R": (0, 1)}.get(part, ())


# -- the in-process engine's stand-in: the same arithmetic, no masks ---------------------------------------------
def secure_mean(summands: list[list[np.ndarray]], weights: list[float], the_plan: Plan,
                rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Σ w_k x_k / Σ w_k as SecAgg+ computes it (flwr's client mod and server workflow), without masks: each
    weight quantized to round(w / max_weight · Q) / Q, the weighted arrays clipped and stochastically rounded by
    Flower's `quantize`, summed modulo 2**32 with the weights, dequantized with Flower's `dequantize`, the
    per-client offset removed and divided by the summed weights. The masks cancel exactly modulo 2**32, so this
    is the protocol's result (up to the rounding's randomness)."""
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_combine, factor_extract, parameters_addition, parameters_mod, parameters_multiply,
    )
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    Q = the_plan.quantization_range
    if rng is not None:  # Flower's stochastic rounding draws from NumPy's global generator
        np.random.seed(int(rng.integers(2**32)))
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
    from dataclasses import replace

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
    return SummedRound(mean_update(server, the_plan, mean, members), members, extra)

