"""Secure aggregation's arithmetic (fedlora.secagg), no model: the server's aggregate from SecAgg+'s sum equals
the plain aggregate within the quantization error for every method whose aggregate is a sum; the others are
refused in one line."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from fedlora import secagg
from fedlora.client import Update
from fedlora.config import ConfigError, load_config
from fedlora.federated_run import build_strategy
from fedlora.server import Server

DIMS = {"m1": (6, 5), "m2": (4, 7)}
HEAD = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)}


def _servers(name: str, ranks: list[int], extra: tuple[str, ...] = ()):
    cfg = load_config(None, [f"strategy.name={name}", f"federation.ranks={ranks}",
                             f"federation.num_clients={len(ranks)}", "privacy.secure_aggregation=true", *extra])
    out = []
    for _ in range(2):
        strategy = build_strategy(cfg, DIMS)
        out.append(Server(cfg, strategy, DIMS, {k: v.copy() for k, v in HEAD.items()}, [30, 50, 40, 20][:len(ranks)]))
    return cfg, out


def _updates(server: Server, rng: np.random.Generator) -> list[Update]:
    """Each client moves what it sends away from its downlink by a little random noise."""
    out = []
    for c in range(len(server.client_ranks)):
        down = server.downlink(c)
        factors = {m: replace(f, A=f.A + (0.01 * rng.normal(size=f.A.shape) if server.strategy.sends_A else 0.0),
                              B=f.B + 0.01 * rng.normal(size=f.B.shape)) for m, f in server.sent_factors(c).items()}
        head = {k: (h + 0.01 * rng.normal(size=h.shape)).astype(np.float32) for k, h in down.head.items()}
        out.append(Update(client_id=c, rank=down.rank, factors=factors, head=head, num_examples=server.client_sizes[c],
                          train_loss=1.0, steps=1, samples=1, train_s=0.1))
    return out


@pytest.mark.parametrize("name,ranks", [("ffa", [4, 8, 8]), ("ffa", [4, 4, 4]), ("fedit", [4, 4, 4]),
                                        ("zeropad", [2, 4, 4, 3]), ("rbla", [2, 4, 4, 3]), ("fedsvd", [4, 4, 4]),
                                        ("rolora", [4, 4, 4]), ("fedsa", [4, 4, 4]), ("fedsb", [4, 4, 4])])
def test_secure_sum_equals_the_plain_aggregate(name, ranks):
    cfg, (plain, secure) = _servers(name, ranks)
    rng = np.random.default_rng(0)
    for _ in range(2):  # two rounds: the second starts from an aggregate
        updates = _updates(plain, rng)
        sampled = list(range(len(ranks)))
        plain.finish_round(updates, sampled)
        summed = secagg.in_process_round(secure, updates, np.random.default_rng(1))
        assert summed.members and all(not u.factors and not u.head for u in summed.members)
        secure.finish_round([], sampled, summed=summed)
        # SecAgg+ quantization: clip 8, 2**22 levels -> a step of 3.8e-6 per weighted value.
        for r in set(ranks):
            a, b = plain.downlink_factors(r), secure.downlink_factors(r)
            for m in DIMS:
                assert a[m].scale == pytest.approx(b[m].scale)
                if name == "fedsvd":  # its SVD re-factoring rotates the factors: compare the product
                    assert np.abs(a[m].delta() - b[m].delta()).max() < 2e-5
                    continue
                assert np.abs(a[m].B - b[m].B).max() < 2e-5 and np.abs(a[m].A - b[m].A).max() < 2e-5
        for k in HEAD:
            assert np.abs(plain.head[k] - secure.head[k]).max() < 2e-5
    assert secure.round == plain.round == 2


def test_secure_mean_is_the_weighted_mean_within_the_quantization_step():
    rng = np.random.default_rng(0)
    xs = [[rng.normal(size=(5, 3)), rng.normal(size=4)] for _ in range(5)]
    w = [10.0, 30.0, 25.0, 5.0, 30.0]
    plan = secagg.Plan(width=1, coefs={}, max_weight=30.0, clip=8.0, bits=22)
    got = secagg.secure_mean(xs, w, plan, np.random.default_rng(1))
    for i in range(2):
        want = sum(wk * x[i] for wk, x in zip(w, xs)) / sum(w)
        assert np.abs(got[i] - want).max() < 16 / 2**22 * 2


@pytest.mark.parametrize("override,words", [
    (["strategy.name=flexlora"], "'flexlora' is not"),
    (["strategy.name=hetlora"], "update norms"),
    (["strategy.name=ffa", "federation.compression=int8"], "compression=none"),
    (["strategy.name=ffa", "federation.aggregation=median"], "individual updates"),
    (["strategy.name=ffa", "federation.clients_per_round=1"], "at least 2 clients"),
])
def test_refused_in_one_line(override, words):
    with pytest.raises(ConfigError) as exc:
        load_config(None, override + ["privacy.secure_aggregation=true"])
    text = str(exc.value)
    assert words in text and "\n" not in text.strip()


def test_failed_round_changes_nothing_and_counts():
    cfg, (server, _) = _servers("ffa", [4, 4, 4])
    before = server.downlink_factors(4)
    outcome = server.finish_round([], [0, 1, 2], failed="secure aggregation halted")
    assert server.round == 1 and outcome.trained == []
    after = server.downlink_factors(4)
    assert all(np.array_equal(before[m].B, after[m].B) for m in DIMS)


# Reproducible noise: this test checks SecAgg's arithmetic against the plain path, so one seed fixes the draw
# (the noise's source and its std on every coordinate are measured in test_client_dp_invariants.py).
CLIENT_DP = ("privacy.mode=client", "privacy.clip=0.05", "privacy.reproducible_noise=true")


@pytest.mark.parametrize("name,ranks", [("ffa", [4, 8, 8]), ("rbla", [2, 4, 4, 3]), ("fedit", [4, 4, 4])])
def test_client_level_dp_clips_on_the_client_and_noises_the_sum(name, ranks):
    """Without noise, SecAgg's clipped sum gives the plain client-DP aggregate (clip binds: each change is ~0.1
    in norm, S = 0.05); with noise, the aggregate moves by N(0, (sigma S / m)^2) per coordinate."""
    _, (plain, secure) = _servers(name, ranks, CLIENT_DP + ("privacy.noise_multiplier=0.0",))
    rng = np.random.default_rng(0)
    updates = _updates(plain, rng)
    sampled = list(range(len(ranks)))
    plain.finish_round(updates, sampled)
    secure.finish_round([], sampled, summed=secagg.in_process_round(secure, updates, np.random.default_rng(1)))
    for r in set(ranks):
        a, b = plain.downlink_factors(r), secure.downlink_factors(r)
        for m in DIMS:
            assert np.abs(a[m].B - b[m].B).max() < 2e-5 and np.abs(a[m].A - b[m].A).max() < 2e-5
    assert secure.mechanism.current_report()["dp_steps"] == 1  # the round was accounted

    sigma = 4.0
    _, (quiet, noisy) = _servers("ffa", [8, 8, 8], CLIENT_DP + (f"privacy.noise_multiplier={sigma}",))
    ups = _updates(quiet, rng)
    quiet.mechanism.sigma = 0.0  # the same clipped sum, without its noise
    s_quiet = secagg.in_process_round(quiet, ups, np.random.default_rng(1))
    s_noisy = secagg.in_process_round(noisy, ups, np.random.default_rng(1))
    quiet.finish_round([], [0, 1, 2], summed=s_quiet)
    noisy.finish_round([], [0, 1, 2], summed=s_noisy)
    diff = np.concatenate([(noisy.downlink_factors(8)[m].B - quiet.downlink_factors(8)[m].B).ravel() for m in DIMS])
    assert np.std(diff) == pytest.approx(sigma * 0.05 / 3, rel=0.15)
