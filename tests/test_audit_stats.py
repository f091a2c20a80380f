"""The audit's statistics against values worked out by hand and against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from fedlora.audit.stats import (
    delta_of_gdp, epsilon_from_guesses, epsilon_of_gdp, gdp_mu_lower_bound, gdp_of_epsilon, one_run_epsilon_lower_bound,
    one_run_p_value, one_shot_epsilon,
)


def delta_by_privacy_loss(mu: float, eps: float) -> float:
    """delta(eps) of N(mu, 1) vs N(0, 1) by integrating the privacy loss L = mu x - mu^2/2 under N(mu, 1):
    E[(1 - e^(eps - L))_+] (the hockey-stick divergence), independent of the closed form."""
    def integrand(x):
        return max(0.0, 1.0 - math.exp(eps - (mu * x - mu * mu / 2))) * stats.norm.pdf(x, mu)
    return integrate.quad(integrand, (eps + mu * mu / 2) / mu, mu + 40)[0]


@pytest.mark.parametrize("mu,eps", [(0.5, 0.3), (1.0, 1.0), (2.0, 3.0), (4.0, 8.0)])
def test_gdp_delta_matches_the_privacy_loss_integral(mu, eps):
    assert delta_of_gdp(mu, eps) == pytest.approx(delta_by_privacy_loss(mu, eps), rel=1e-6, abs=1e-14)


def test_gdp_delta_at_eps_zero_is_the_total_variation():
    # At eps = 0, delta is TV(N(0,1), N(mu,1)) = 2 Phi(mu/2) - 1: 0.38292... for mu = 1.
    assert delta_of_gdp(1.0, 0.0) == pytest.approx(0.3829249225480262, rel=1e-12)


@pytest.mark.parametrize("mu", [0.3, 1.0, 2.5])
def test_gdp_conversions_invert_each_other(mu):
    eps = epsilon_of_gdp(mu, 1e-5)
    assert delta_of_gdp(mu, eps) == pytest.approx(1e-5, rel=1e-6)
    assert gdp_of_epsilon(eps, 1e-5) == pytest.approx(mu, rel=1e-8)
    assert epsilon_of_gdp(mu * 1.1, 1e-5) > eps  # monotone in mu


def test_p_value_with_every_guess_right_and_no_delta_is_the_accuracy_to_the_r():
    # eps-DP randomized response is right w.p. e^eps/(1+e^eps); r right of r: that to the power r.
    q = math.exp(1.0) / (1 + math.exp(1.0))
    assert one_run_p_value(1000, 20, 20, 1.0, 0.0) == pytest.approx(q ** 20, rel=1e-12)
    # By hand: 0.05^(1/100) = 0.970487, logit = ln(0.970487/0.029513) = 3.49297.
    assert epsilon_from_guesses(1000, 100, 100, 0.0, 0.95) == pytest.approx(3.49297, abs=1e-4)


def test_p_value_delta_term_by_hand():
    # r = 2, v = 2, eps = 0: Binom(2, 1/2). beta = 1/4; alpha = max(P[B=1]/1, (P[B=1]+P[B=0])/2) = max(1/2, 3/8).
    assert one_run_p_value(10, 2, 2, 0.0, 0.01) == pytest.approx(0.25 + 2 * 10 * 0.01 * 0.5, rel=1e-12)


def test_delta_weakens_the_bound():
    assert epsilon_from_guesses(1000, 100, 100, 1e-5, 0.95) < epsilon_from_guesses(1000, 100, 100, 0.0, 0.95)
    assert epsilon_from_guesses(1000, 100, 50, 0.0, 0.95) == 0.0  # chance accuracy shows nothing


def test_perfect_separation_reaches_the_ceiling_of_the_guesses():
    rng = np.random.default_rng(0)
    inserted = rng.random(1000) < 0.5
    scores = inserted + 0.01 * rng.normal(size=1000)
    out = one_run_epsilon_lower_bound(scores, inserted, 1e-5, 0.95)
    # The coins put ~500 in, so guessing all 1000 (500 "in") makes mistakes; every guess of the best count is right.
    r = out["guesses"]
    assert out["correct"] == r >= 500
    ceiling = epsilon_from_guesses(1000, r, r, 1e-5, 1 - 0.05 / 6)  # Bonferroni over the 6 guess counts
    assert out["epsilon"] == pytest.approx(ceiling, rel=1e-6) and out["epsilon"] > 4


def test_randomized_response_is_never_over_audited():
    """An exactly eps-DP mechanism (randomized response on the coin, eps = 1): the bound stays below 1 in every
    one of 20 seeded trials (each may exceed it with probability 5% at most), and is not trivial."""
    eps0, bounds = 1.0, []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        inserted = rng.random(2000) < 0.5
        truthful = rng.random(2000) < math.exp(eps0) / (1 + math.exp(eps0))
        said = np.where(truthful, inserted, ~inserted)
        scores = said + 1e-6 * rng.random(2000)  # ties broken at random
        bounds.append(one_run_epsilon_lower_bound(scores, inserted, 0.0, 0.95)["epsilon"])
    assert max(bounds) <= eps0 and min(bounds) > 0.5 * eps0


def test_gdp_mu_lower_bound_of_a_gaussian_pair():
    rng = np.random.default_rng(1)
    out, inn = rng.normal(0, 1, 20000), rng.normal(1.0, 1, 20000)
    lb = gdp_mu_lower_bound(inn, out, threshold=0.5, confidence=0.95)
    assert 0.9 < lb < 1.0
    assert gdp_mu_lower_bound(out, out, threshold=0.0) == 0.0


def test_one_shot_estimate_of_a_known_shift():
    rng = np.random.default_rng(2)
    d = 10_000
    null = rng.normal(0, 1 / math.sqrt(d), 5000)
    inserted = rng.normal(2.0 / math.sqrt(d), 1 / math.sqrt(d), 5000)  # mu = 2
    est = one_shot_epsilon(inserted, 1e-5, dim=d)
    assert est["mu"] == pytest.approx(2.0, abs=0.05)
    assert est["epsilon"] == pytest.approx(epsilon_of_gdp(2.0, 1e-5), rel=0.05)
    assert one_shot_epsilon(inserted, 1e-5, scores_out=null)["mu"] == pytest.approx(2.0, abs=0.06)


def test_one_shot_estimate_needs_a_spread_and_never_invents_an_infinite_epsilon():
    null = np.array([0.0, 0.1, -0.1, 0.05])
    one = one_shot_epsilon(np.array([0.3]), 1e-5, scores_out=null)  # one inserted canary: no spread to fit
    assert one["epsilon"] is None and one["mu"] is None and "too few" in one["note"]
    assert one_shot_epsilon(np.array([0.3, 0.4]), 1e-5, scores_out=np.array([0.0]))["epsilon"] is None
    # identical scores (noise off): perfectly separated above the null, nothing below it
    assert math.isinf(one_shot_epsilon(np.array([2.0, 2.0, 2.0]), 1e-5, scores_out=null)["epsilon"])
    assert one_shot_epsilon(np.array([-1.0, -1.0]), 1e-5, scores_out=null)["epsilon"] == 0.0
