"""Client-level DP (DP-FedAvg): the clipping and noise primitives, and the mechanism measured on the path a run
takes (`Server.finish_round` -> `dp.ClientLevelDP.prepare` -> the strategy's aggregate), for every strategy and
for mixed ranks: the noise in the aggregate, each client's contribution, the accountant."""

from __future__ import annotations

import numpy as np
import pytest

import math

from fedlora.client import Update
from fedlora.config import load_config
from fedlora.federated_run import build_strategy
from fedlora.privacy import ClientAccountant
from fedlora.privacy.client_dp import clip_update, gaussian_noise, update_norm
from fedlora.server import Server
from fedlora.strategies import LoraFactors, available_strategies, get_strategy


def _update(rng, scale=1.0):
    return {
        "layer.0.query.B": rng.normal(0, scale, (16, 4)),
        "layer.0.value.B": rng.normal(0, scale, (16, 4)).astype(np.float32),
        "classifier.weight": rng.normal(0, scale, (2, 16)),
    }


def test_update_norm_is_joint_l2():
    rng = np.random.default_rng(0)
    upd = _update(rng)
    flat = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in upd.values()])
    assert update_norm(upd) == pytest.approx(np.linalg.norm(flat), rel=1e-12)
    with pytest.raises(ValueError, match="non-finite"):
        update_norm({"a": np.array([1.0, np.nan])})


def test_clip_update_scales_jointly_and_keeps_small_updates():
    rng = np.random.default_rng(1)
    upd = _update(rng, scale=3.0)
    clipped, before = clip_update(upd, clip=1.5)
    assert before > 1.5
    assert update_norm(clipped) == pytest.approx(1.5, rel=1e-6)
    ratio = clipped["layer.0.query.B"] / upd["layer.0.query.B"]
    assert np.allclose(ratio, ratio.flat[0])  # one factor for everything: direction kept
    assert all(clipped[k].dtype == upd[k].dtype for k in upd)
    small, norm_small = clip_update(clipped, clip=10.0)
    assert norm_small == pytest.approx(1.5, rel=1e-6)
    assert all(np.array_equal(small[k], clipped[k]) for k in clipped)
    zero, n0 = clip_update({"a": np.zeros(3)}, clip=1.0)
    assert n0 == 0.0 and np.all(zero["a"] == 0)
    with pytest.raises(ValueError, match="clip"):
        clip_update(upd, clip=0.0)


def test_gaussian_noise_has_the_requested_std():
    rng = np.random.default_rng(2)
    upd = {"a": np.zeros((200, 100)), "b": np.zeros(5000, dtype=np.float32)}
    noisy = gaussian_noise(upd, std=0.3, rng=rng)
    values = np.concatenate([noisy["a"].ravel(), noisy["b"].astype(np.float64)])
    n = values.size
    # Sample variance of n normal draws: relative std sqrt(2/n) ~ 0.8%; allow 5 sigma.
    assert abs(values.var() / 0.09 - 1) < 5 * np.sqrt(2 / n)
    assert abs(values.mean()) < 5 * 0.3 / np.sqrt(n)
    assert noisy["b"].dtype == np.float32
    assert np.array_equal(gaussian_noise(upd, 0.0, rng)["a"], upd["a"])
    with pytest.raises(ValueError):
        gaussian_noise(upd, -1.0, rng)


# -- the mechanism on the path that runs --------------------------------------------------------------------------
DIMS = {"enc.0.query": (6, 5), "enc.0.value": (7, 5)}
HEAD = {"classifier.weight": np.zeros((2, 5), np.float32), "classifier.bias": np.zeros(2, np.float32)}
K, M = 20, 10  # clients, expected clients per round (Poisson q = M / K)


def dp_server(method: str, ranks: str, sigma: float, clip: float, seed: int = 0) -> Server:
    cfg = load_config(None, [f"strategy.name={method}", f"federation.num_clients={K}",
                             f"federation.clients_per_round={M}", f"federation.ranks={ranks}", "privacy.mode=client",
                             f"privacy.noise_multiplier={sigma}", f"privacy.clip={clip}", f"seed={seed}",
                             "federation.max_update_norm=1e12"])
    cfg.federation.norm_bound_factor = None  # only the DP clip acts here
    return Server(cfg, build_strategy(cfg, DIMS), DIMS, {k: v.copy() for k, v in HEAD.items()}, [10] * K)


def unchanged(server: Server, c: int) -> Update:
    """Client c sends back exactly what it was sent (a zero change)."""
    down = server.downlink(c)
    factors = down.factors or server.reference(Update(c, down.rank, {}, {}, 1, 0.0, 0, 0, 0.0))[0]
    factors = {m: LoraFactors(A=np.array(f.A, np.float32), B=np.array(f.B, np.float32), scale=f.scale)
               for m, f in factors.items()}
    return Update(c, down.rank, factors, {k: v.copy() for k, v in down.head.items()}, 10, 0.5, 1, 10, 0.1)


def method_ranks(method: str) -> str:
    return "[4, 16]" if get_strategy(method).supports_mixed_ranks else "[4]"  # Fed-SB: r <= d_in = 5


# Linear methods whose downlink B is the averaged B itself; FedSVD re-factors B̄·A after averaging (its own test).
REFACTORED = [m for m in available_strategies()
              if get_strategy(m).linear and get_strategy(m).receives_A and not get_strategy(m).sends_A]
LINEAR = [m for m in available_strategies() if get_strategy(m).linear and m not in REFACTORED]
OTHERS = [m for m in available_strategies() if not get_strategy(m).linear]


def test_every_strategy_is_covered():
    assert set(LINEAR) >= {"ffa", "fedit", "zeropad", "rbla"} and set(OTHERS) >= {"hetlora", "flexlora", "flora"}
    assert set(LINEAR) | set(REFACTORED) | set(OTHERS) == set(available_strategies())


@pytest.mark.parametrize("method", REFACTORED)
def test_refactoring_methods_noise_the_averaged_B_before_refactoring(method):
    """FedSVD averages B (noise once on the sum, over m fixed) and then re-factors B̄·A: the prepared updates'
    mean is B̄, whose noise std is sigma*C/m, and one huge client moves it by exactly C/m."""
    sigma, clip = 1.3, 0.7
    server = dp_server(method, "[8]", sigma, clip)
    sampled = list(range(K))
    prepared, weights, extra = server.mechanism.prepare(server, [unchanged(server, c) for c in sampled])
    assert extra["noise_placement"] == "sum" and weights == [1.0] * K
    mean_B = np.concatenate([np.mean([u.factors[m].B for u in prepared], axis=0).ravel() for m in DIMS])
    head = np.concatenate([np.mean([u.head[k] for u in prepared], axis=0).ravel() for k in HEAD])
    draws = np.concatenate([mean_B, head])  # the reference B and head are 0 here
    assert np.std(draws) == pytest.approx(sigma * clip / M, rel=0.25)  # 108 draws: a loose but real bound
    quiet = dp_server(method, "[8]", 0.0, clip)
    ups = [unchanged(quiet, c) for c in sampled]
    ups[0].factors = {m: LoraFactors(A=f.A, B=f.B + 5.0, scale=f.scale) for m, f in ups[0].factors.items()}
    prepared, _, _ = quiet.mechanism.prepare(quiet, ups)
    moved = np.concatenate([np.mean([u.factors[m].B for u in prepared], axis=0).ravel() for m in DIMS])
    assert float(np.linalg.norm(moved)) * M == pytest.approx(clip, rel=1e-6)


def expected_count(server: Server, slot: int) -> float:
    """m_j: the fixed denominator of slot j, q times the clients that hold it (per-slot means), else q*K."""
    if not server.strategy.per_slot_mean:
        return float(M)
    return M / K * sum(r > slot for r in server.client_ranks)


@pytest.mark.parametrize("method", LINEAR)
def test_linear_methods_aggregate_noise_is_sigma_clip_over_expected_clients(method):
    """Zero updates: what moves B and the head is the noise alone, std sigma*C/m_j with m_j fixed (q*K, or
    q times the holders of slot j under per-slot means), not the round's number of replies, which varies
    under Poisson sampling."""
    sigma, clip = 1.3, 0.7
    draws, sizes = [], []
    for seed in range(30):
        server = dp_server(method, method_ranks(method), sigma, clip, seed)
        sampled = server.sample_clients()
        if not any(server.client_ranks[c] == max(server.client_ranks) for c in sampled):
            continue  # no client of the widest rank this round: its columns are not aggregated
        sizes.append(len(sampled))
        server.finish_round([unchanged(server, c) for c in sampled], sampled)
        _, glob = server.global_eval_factors()  # the widest rank's view: B in the aggregate's scale
        up = server.strategy.roles(1).up
        measured = ("B",) if "B" in up else up  # FedSA sends A alone, Fed-SB its core R
        for name, f in glob.items():
            now = server.strategy.to_parts(name, f, measured)
            start = server.strategy.to_parts(name, server.initial[name], measured)
            for part, value in now.items():
                change = value.astype(np.float64) - start[part]
                m_j = np.array([expected_count(server, j) for j in range(f.rank)])
                per_slot = m_j[None, :] if part == "B" else m_j[:, None] if part == "A" else float(M)
                draws.append((change * per_slot / (sigma * clip)).ravel())
        draws.append(np.concatenate([h.ravel() for h in server.head.values()]).astype(np.float64) * M / (sigma * clip))
    values = np.concatenate(draws)
    assert len(set(sizes)) > 1, "Poisson sampling: the rounds differ in size"
    # n ~ 4,000 standardised draws: the sample std is within ~1.1% of 1 (1 sigma); allow 5%.
    assert values.std() == pytest.approx(1.0, rel=0.05)
    assert abs(values.mean()) < 5 / math.sqrt(values.size)


@pytest.mark.parametrize("method", OTHERS)
def test_other_methods_release_each_update_with_full_noise(method):
    """Methods that read clients one by one: every clipped update carries N(0, sigma^2 C^2) itself."""
    sigma, clip = 0.9, 0.5
    server = dp_server(method, method_ranks(method), sigma, clip)
    sampled = list(range(K))
    prepared, weights, extra = server.mechanism.prepare(server, [unchanged(server, c) for c in sampled])
    assert extra["noise_placement"] == "each" and weights == [1.0] * K
    noise = []
    for u in prepared:
        ref = unchanged(server, u.client_id)
        for m, f in u.factors.items():
            noise.append((f.B.astype(np.float64) - ref.factors[m].B).ravel())
            noise.append((f.A.astype(np.float64) - ref.factors[m].A).ravel())
        noise += [(u.head[k].astype(np.float64) - ref.head[k]).ravel() for k in u.head]
    values = np.concatenate(noise)
    assert values.std() == pytest.approx(sigma * clip, rel=0.05)


@pytest.mark.parametrize("method", LINEAR + OTHERS)
def test_no_client_contributes_more_than_the_clip(method):
    """sigma = 0: one client with a huge change among zero ones. For linear methods its change in the
    aggregate's coordinates, times m, is exactly C (the rank-4 client among rank-16 ones too: it is clipped in
    the aggregate's scale, where FFA weighs it by s_4/s_16 = 4). For the others its released change is C."""
    clip = 0.4
    server = dp_server(method, method_ranks(method), 0.0, clip)
    sampled = list(range(K))
    ups = [unchanged(server, c) for c in sampled]
    big = 0 if server.client_ranks[0] == min(server.client_ranks) else 1
    ups[big].factors = {m: LoraFactors(A=f.A + (5.0 if server.strategy.sends_A else 0.0), B=f.B + 5.0, scale=f.scale)
                        for m, f in ups[big].factors.items()}
    ups[big].head = {k: v + 5.0 for k, v in ups[big].head.items()}
    prepared, _, _ = server.mechanism.prepare(server, ups)
    if not server.strategy.linear:
        for u, p in zip(ups, prepared):
            ref = unchanged(server, u.client_id)
            change = [(p.factors[m].B - ref.factors[m].B).ravel() for m in DIMS]
            change += [(p.factors[m].A - ref.factors[m].A).ravel() for m in DIMS] if server.strategy.sends_A else []
            change += [(p.head[k] - ref.head[k]).ravel() for k in p.head]
            norm = float(np.linalg.norm(np.concatenate(change)))
            assert norm <= clip * (1 + 1e-6) and (u.client_id != big or norm == pytest.approx(clip, rel=1e-6))
        return
    server.finish_round(ups, sampled)
    _, glob = server.global_eval_factors()
    # The big client's change, back in sum coordinates (slot j times m_j, the head times m): exactly C.
    zero_round = dp_server(method, method_ranks(method), 0.0, clip)
    zero_round.finish_round([unchanged(zero_round, c) for c in sampled], sampled)
    _, base = zero_round.global_eval_factors()
    change = []
    for name, f in glob.items():
        m_j = np.array([expected_count(server, j) for j in range(f.B.shape[1])])
        change.append(((f.B.astype(np.float64) - base[name].B) * m_j[None, :]).ravel())
        if server.strategy.sends_A:
            change.append(((f.A.astype(np.float64) - base[name].A) * m_j[:, None]).ravel())
    change += [(h.astype(np.float64) - zero_round.head[k]).ravel() * M for k, h in server.head.items()]
    assert float(np.linalg.norm(np.concatenate(change))) == pytest.approx(clip, rel=1e-4)


def test_accounting_runs_once_per_round_and_matches_opacus(monkeypatch):
    """One accountant for the federation: epsilon is computed once a round, not once per client."""
    from opacus.accountants import RDPAccountant

    calls = []
    real = ClientAccountant.epsilon
    monkeypatch.setattr(ClientAccountant, "epsilon", lambda self, delta: calls.append(1) or real(self, delta))
    server = dp_server("ffa", "[8]", 1.1, 1.0)
    for _ in range(3):
        sampled = server.sample_clients()
        server.finish_round([unchanged(server, c) for c in sampled], sampled)
    assert len(calls) == 3
    ref = RDPAccountant()
    for _ in range(3):
        ref.step(noise_multiplier=1.1, sample_rate=M / K)
    row = server.mechanism.metrics(server)
    assert row["epsilon"] == pytest.approx(ref.get_epsilon(delta=1e-5), rel=1e-9)
    assert row["sample_rate"] == M / K and row["dp_steps"] == 3
