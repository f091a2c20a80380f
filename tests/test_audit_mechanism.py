"""The client-level DP round audited as a mechanism (issue 27), on the server's own path (`Server.finish_round`,
norm bounds on, SecAgg's arithmetic where asked): one round run with and without a canary client whose change
is a large multiple of a fixed unit direction c in the fixed coordinates the method aggregates, projected on c.
The Gaussian-DP lower bound from those projections must come within 20% of the epsilon that sigma promises for
one step, never above it, for every linear method (mixed ranks where the method takes them), and must break when
sigma is halved behind the accountant's back.

10^4 rounds per arm in seconds: the release is affine in the noise the stage draws. Each arm's round is run on the
real path with a stand-in generator that records every draw's std and returns zeros (the noise-free release),
then ones for one draw at a time (where that draw lands, and with which factor). Noise is then drawn in bulk with
the stds the stage asked for. That the release really is that affine map is checked on the same path with real
draws (any clip, rescale or extra draw after the noise would show there).
"""

from __future__ import annotations

import numpy as np
import pytest

from client_dp_helpers import K, LINEAR, divisor, dp_server, expected_counts, finish, moved, ranks_for, unchanged
from fedlora.audit.stats import epsilon_of_gdp, gdp_mu_lower_bound
from fedlora.protocol import contribution_coef, truncate
from fedlora.round.client_dp import layout

SIGMA, CLIP, DELTA, ROUNDS = 1.0, 0.5, 1e-5, 10_000
OTHERS = [0, 1, 2, 5, 6]  # the round's other clients (fixed: the neighbouring rounds differ by the canary alone)


class ProbeNoise:
    """Stands in for the mechanism's noise generator: records (std, shape) of every draw and returns zeros,
    ones for draw `hot`, or real draws from `real` (which it records)."""

    def __init__(self, hot: int | None = None, real: np.random.Generator | None = None):
        self.hot, self.real, self.draws = hot, real, []

    def normal(self, loc=0.0, scale=1.0, size=None):
        shape = tuple(np.atleast_1d(size)) if size is not None else ()
        if self.real is not None:
            out = self.real.normal(loc, scale, size=shape)
        else:
            out = np.full(shape, 1.0 if len(self.draws) == self.hot else 0.0)
        self.draws.append((float(scale), shape, out))
        return out


def canary_direction(server, seed: int = 3) -> dict[str, np.ndarray]:
    """A fixed unit vector over every released coordinate (the fixed coordinates: r_max slots, and the head)."""
    rng = np.random.default_rng(seed)
    d = {k: rng.normal(size=s) for k, s in layout(server).items()}
    norm = np.sqrt(sum(np.sum(a * a) for a in d.values()))
    return {k: a / norm for k, a in d.items()}


def canary_update(server, c: int, direction: dict[str, np.ndarray], size: float):
    """Client c changes what it sends by `size` times `direction` in the fixed coordinates (B divided by its
    c_k, so that its change there is exactly size * direction); clipping leaves S * direction."""
    u = unchanged(server, c)
    coef = contribution_coef(server.strategy, server.cfg.lora.scale, u.rank, server.r_max)
    factors = {}
    for m, f in u.factors.items():
        sent = server.strategy.to_parts(m, f, server.up_parts())
        for p, a in sent.items():
            step = truncate(f"{m}.{p}", direction[f"{m}.{p}"], u.rank) / (coef if p == "B" else 1.0)
            sent[p] = np.asarray(a + size * step, np.float32)
        factors[m] = server.strategy.from_parts(m, sent, f)
    head = {k: (h + size * direction[f"head.{k}"]).astype(np.float32) for k, h in u.head.items()}
    return type(u)(c, u.rank, factors, head, u.num_examples, 0.5, 1, 10, 0.1)


def one_round(method, secure, with_canary, noise, sigma_bug=None):
    """(score weights, release) of one round on a fresh server, its noise from `noise` (the weights are taken
    before the round: what a method sends can change with the round, RoLoRA's)."""
    server = dp_server(method, ranks_for(method), SIGMA, CLIP, secure=secure)
    if sigma_bug is not None:
        server.mechanism.sigma = sigma_bug  # after calibration: the accountant was told SIGMA
    server.mechanism.noise_rng = noise
    canary = next(c for c, r in enumerate(server.client_ranks)  # widest rank: its slots cover every coordinate
                  if r == server.r_max and c not in OTHERS)
    weights = whitened_weights(server, canary_direction(server))
    updates = [moved(server, c, np.random.default_rng(100 + c), z) for c, z in zip(OTHERS, [0.01, 0.3, 1.0, 5.0, 50.0])]
    sampled = list(OTHERS)
    if with_canary:
        updates.append(canary_update(server, canary, canary_direction(server), 100 * CLIP))
        sampled = sorted(sampled + [canary])
    return weights, finish(server, updates, sampled).release


def whitened_weights(server, direction):
    """Score = <release * m, c>: the release times each coordinate's expected count, projected on c (the
    likelihood-ratio direction when m varies by slot). Shift S, noise std sigma*S when the stage is right."""
    m_j = expected_counts(server.client_ranks, server.mechanism.q, server.strategy.per_slot_mean, server.r_max)
    return {k: direction[k] * divisor(k, a.shape, m_j, server.mechanism.q * K) for k, a in direction.items()}


def bulk_scores(method, secure, with_canary, rounds, rng, sigma_bug=None):
    """(`rounds` scores of this arm, its noise-free score): the noise-free score plus each draw's bulk noise
    times where it lands."""
    probe = ProbeNoise()
    w, base = one_round(method, secure, with_canary, probe, sigma_bug)
    clean = sum(float(np.sum(base[k] * w[k])) for k in base)
    score = np.full(rounds, clean)
    effects = []
    for i, (std, shape, _) in enumerate(probe.draws):
        _, hot = one_round(method, secure, with_canary, ProbeNoise(hot=i), sigma_bug)
        moved_keys = [k for k in base if np.any(hot[k] != base[k])]
        assert len(moved_keys) == 1 and hot[moved_keys[0]].shape == shape, (i, moved_keys)
        effect = hot[moved_keys[0]] - base[moved_keys[0]]  # a draw of 1 on every coordinate of this array
        effects.append((moved_keys[0], effect))
        score += (rng.normal(0.0, std, size=(rounds, *shape)) * (effect * w[moved_keys[0]])).reshape(rounds, -1).sum(1)
    # The affine model against the real path with real draws.
    real = ProbeNoise(real=np.random.default_rng(11))
    _, release = one_round(method, secure, with_canary, real, sigma_bug)
    model = {k: a.copy() for k, a in base.items()}
    for (key, effect), (_, _, drawn) in zip(effects, real.draws):
        model[key] = model[key] + drawn * effect
    for k in release:
        np.testing.assert_allclose(release[k], model[k], rtol=1e-9, atol=1e-12)
    return score, clean


def audit_one_step(method, secure, sigma_bug=None, rounds=ROUNDS):
    """(epsilon lower bound at 95%, epsilon of one step at SIGMA) from `rounds` rounds per arm."""
    rng = np.random.default_rng(2024)
    out, clean_out = bulk_scores(method, secure, False, rounds, rng, sigma_bug)
    inn, clean_in = bulk_scores(method, secure, True, rounds, rng, sigma_bug)
    # The threshold: the noise-free midpoint, fixed before any noisy score is looked at.
    mu = gdp_mu_lower_bound(inn, out, 0.5 * (clean_out + clean_in), confidence=0.95)
    return epsilon_of_gdp(mu, DELTA), epsilon_of_gdp(1.0 / SIGMA, DELTA)


@pytest.mark.parametrize("method,secure", [(m, s) for m in LINEAR for s in (False, True)])
def test_the_round_leaks_what_sigma_promises_and_no_more(method, secure):
    lower, promised = audit_one_step(method, secure)
    assert 0.8 * promised <= lower <= promised, (lower, promised)


@pytest.mark.parametrize("secure", [False, True])
def test_halved_sigma_behind_the_accountants_back_fails_the_audit(secure):
    lower, promised = audit_one_step("fedit", secure, sigma_bug=SIGMA / 2)
    assert lower > promised * 1.3, (lower, promised)
