"""Client-level DP (DP-FedAvg) clipping and noise on NumPy updates."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.privacy.client_dp import (
    add_gaussian_noise,
    client_dp_noise_std,
    client_sample_rate,
    clip_update,
    update_norm,
)


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
    noisy = add_gaussian_noise(upd, std=0.3, rng=rng)
    values = np.concatenate([noisy["a"].ravel(), noisy["b"].astype(np.float64)])
    n = values.size
    # Sample variance of n normal draws: relative std sqrt(2/n) ~ 0.8%; allow 5 sigma.
    assert abs(values.var() / 0.09 - 1) < 5 * np.sqrt(2 / n)
    assert abs(values.mean()) < 5 * 0.3 / np.sqrt(n)
    assert noisy["b"].dtype == np.float32
    assert np.array_equal(add_gaussian_noise(upd, 0.0, rng)["a"], upd["a"])
    with pytest.raises(ValueError):
        add_gaussian_noise(upd, -1.0, rng)


def test_noise_on_sum_scaled_to_mean():
    rng = np.random.default_rng(3)
    sigma, clip, m = 1.2, 0.5, 8
    assert client_dp_noise_std(sigma, clip, m) == pytest.approx(sigma * clip / m)
    # Simulate the server: sum of m clipped updates + N(0, (sigma*S)^2), divided by m.
    updates = [clip_update(_update(rng, 2.0), clip)[0] for _ in range(m)]
    total = {k: sum(u[k].astype(np.float64) for u in updates) for k in updates[0]}
    draws = np.stack(
        [add_gaussian_noise(total, sigma * clip, rng)["layer.0.query.B"] / m - total["layer.0.query.B"] / m for _ in range(400)]
    )
    assert draws.std() == pytest.approx(client_dp_noise_std(sigma, clip, m), rel=0.05)
    assert client_sample_rate(10, 100) == 0.1
    with pytest.raises(ValueError):
        client_sample_rate(0, 100)
    with pytest.raises(ValueError):
        client_dp_noise_std(1.0, 1.0, 0)
