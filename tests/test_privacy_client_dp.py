"""Client-level DP (DP-FedAvg): the clipping and noise primitives and the accountant. The mechanism's invariants
(sensitivity, noise on every coordinate, noise source, pipeline order) are measured on the server's own path in
test_client_dp_invariants.py."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.privacy import ClientAccountant
from fedlora.privacy.client_dp import clip_update, gaussian_noise, update_norm
from client_dp_helpers import K, M, dp_server, unchanged


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


def test_accounting_runs_once_per_round_and_matches_opacus(monkeypatch):
    """One accountant for the federation: epsilon is computed once a round, not once per client."""
    from opacus.accountants import RDPAccountant

    calls = []
    real = ClientAccountant.epsilon
    monkeypatch.setattr(ClientAccountant, "epsilon", lambda self, delta: calls.append(1) or real(self, delta))
    server = dp_server("ffa", [8], 1.1, 1.0)
    for _ in range(3):
        sampled = server.sample_clients()
        server.finish_round([unchanged(server, c) for c in sampled], sampled)
        server.mechanism.metrics(server.privacy)  # the metrics row asks once a round
        server.mechanism.metrics(server.privacy)
    assert len(calls) == 3
    ref = RDPAccountant()
    for _ in range(3):
        ref.step(noise_multiplier=1.1, sample_rate=M / K)
    row = server.mechanism.metrics(server.privacy)
    assert row["epsilon"] == pytest.approx(ref.get_epsilon(delta=1e-5), rel=1e-9)
    assert row["sample_rate"] == M / K and row["dp_steps"] == 3
