"""White-box gradient canaries in DP-SGD (issue 27), on a tiny linear model through the project's own
`private_training` (Opacus' per-example clipping, flat and per group): a sampled canary moves the noisy sum by
exactly one clipped example; without noise the one-run bound finds every canary; at a calibrated epsilon it
stays at or below the accountant; planted bugs (noise cut behind the accountant's back, a canary escaping the
clip) push it above."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedlora.audit.gradient_canaries import GradientCanaries
from fedlora.audit.stats import epsilon_from_guesses, one_run_epsilon_lower_bound
from fedlora.privacy import (ClientAccountant, calibrate_noise_multiplier, noise_only_step, poisson_batches,
                             private_training)

N, Q, STEPS, DELTA, CLIP = 64, 0.25, 40, 1e-5, 1.0
COUNT = 1000


def audited_steps(sigma: float, canaries: GradientCanaries, *, clip_groups=None, tamper=None, steps=STEPS,
                  seed=0) -> ClientAccountant:
    """DP-SGD on a two-layer linear regression (2,080 and 1,056 parameters: every group holds the 1,000 canaries
    orthogonally) with the canaries hooked in; `tamper(dp_optimizer)` plants a bug
    after the accountant's step hook has recorded sigma."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 32))
    x, y = torch.randn(N, 64), torch.randn(N, 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    acc = ClientAccountant("rdp")
    rng = np.random.default_rng(seed)
    groups = None if clip_groups is None else [([*model[0].parameters()], clip_groups[0]),
                                               ([*model[1].parameters()], clip_groups[1])]
    with private_training(model, opt, noise_multiplier=sigma, clip=CLIP, expected_batch_size=int(Q * N),
                          accountant=acc, sample_rate=Q, clip_groups=groups,
                          generator=torch.Generator().manual_seed(seed)) as (module, dp_opt):
        if tamper is not None:
            tamper(dp_opt)
        with canaries.hooked(dp_opt, Q):
            for idx in poisson_batches(N, Q, steps, rng):
                if len(idx) == 0:
                    noise_only_step(dp_opt)
                else:
                    nn.functional.mse_loss(module(x[idx]), y[idx]).backward()
                    dp_opt.step()
                dp_opt.zero_grad()
    return acc


def coins(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random(COUNT) < 0.5


@pytest.mark.parametrize("clips", [None, (0.05, 1.0)])
def test_a_sampled_canary_moves_each_group_by_exactly_its_clip(clips, one_torch_thread):
    # One canary, always sampled, no real example (empty batches), no noise: the released sum is the canary.
    inserted = np.array([True, False])
    canaries = GradientCanaries(inserted, seed=3)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    groups = None if clips is None else [([*model[0].parameters()], clips[0]), ([*model[1].parameters()], clips[1])]
    seen = []
    with private_training(model, opt, noise_multiplier=0.0, clip=CLIP, expected_batch_size=1,
                          clip_groups=groups) as (_, dp_opt):
        dp_opt.attach_step_hook(lambda o: seen.append([p.grad.clone() for p in o.params]))
        with canaries.hooked(dp_opt, 1.0):
            noise_only_step(dp_opt)
            dp_opt.zero_grad()
    grads = seen[0]  # after Opacus divides by the expected batch size (1 here)
    norms = [float(torch.sqrt(sum(g.pow(2).sum() for g in grads[i:i + 2]))) for i in (0, 2)]
    if clips is None:
        assert float(np.sqrt(sum(n * n for n in norms))) == pytest.approx(CLIP, rel=1e-5)
    else:
        assert norms == pytest.approx(list(clips), rel=1e-5)
    # The score sums <u_g, y_g> / C_g over groups: 1 per group for the sampled canary; the other stays near 0.
    assert canaries.scores[0] == pytest.approx(1.0 if clips is None else 2.0, rel=1e-5)
    assert abs(canaries.scores[1]) < 1.0 and canaries.sampled.tolist() == [1, 0]


def test_without_noise_every_canary_is_found(one_torch_thread):
    inserted = coins()
    canaries = GradientCanaries(inserted, seed=5)
    audited_steps(0.0, canaries, clip_groups=(0.05, 1.0))
    assert canaries.ever_sampled() == inserted.sum()  # (1 - q)^40: none missed
    lb = one_run_epsilon_lower_bound(canaries.scores, inserted, DELTA)
    assert lb["correct"] == lb["guesses"] >= COUNT // 2  # every guess right: the ceiling of these guesses
    assert lb["epsilon"] == pytest.approx(epsilon_from_guesses(COUNT, lb["guesses"], lb["guesses"], DELTA,
                                                               1 - 0.05 / 6), rel=1e-6)
    assert lb["epsilon"] > 4.0


def sigma_for(eps: float) -> float:
    return calibrate_noise_multiplier(eps, DELTA, Q, STEPS, "rdp")


@pytest.mark.parametrize("clips", [None, (0.05, 1.0)])
def test_at_a_calibrated_epsilon_the_bound_stays_below_the_accountant(clips, one_torch_thread):
    inserted = coins(2)
    canaries = GradientCanaries(inserted, seed=7)
    acc = audited_steps(sigma_for(2.0), canaries, clip_groups=clips)
    eps = acc.epsilon(DELTA)
    assert eps == pytest.approx(2.0, rel=0.02)
    assert one_run_epsilon_lower_bound(canaries.scores, inserted, DELTA)["epsilon"] <= eps


class UnclippedCanaries(GradientCanaries):
    def contribution(self, clip: float) -> float:
        return 10 * clip  # a planted bug: an "example" whose gradient escaped the clip


@pytest.mark.parametrize("bug", ["noise cut to a tenth", "canary not clipped"])
def test_a_planted_bug_pushes_the_bound_above_the_accountant(bug, one_torch_thread):
    inserted = coins(3)
    sigma = sigma_for(1.0)
    if bug == "canary not clipped":
        canaries, tamper = UnclippedCanaries(inserted, seed=9), None
    else:
        canaries = GradientCanaries(inserted, seed=9)

        def tamper(dp_opt):  # the accountant's step hook already holds sigma: it keeps charging for it
            dp_opt.noise_multiplier = sigma / 10
    acc = audited_steps(sigma, canaries, clip_groups=(0.05, 1.0), tamper=tamper)
    eps = acc.epsilon(DELTA)
    assert eps == pytest.approx(1.0, rel=0.02)
    assert one_run_epsilon_lower_bound(canaries.scores, inserted, DELTA)["epsilon"] > eps
