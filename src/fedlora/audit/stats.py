"""The statistics of a privacy audit: lower bounds and estimates of epsilon from canary scores.

Pure NumPy/SciPy, written by hand: the reference implementations (jax_privacy's auditing module, the papers'
notebooks) pull in JAX or TensorFlow with dp_accounting for a few dozen lines of arithmetic.

- `one_run_epsilon_lower_bound`: Steinke, Nasr & Jagielski, "Privacy auditing with one (1) training run"
  (NeurIPS 2023), Theorem 3 with the p-value of their Appendix D. m canaries, each inserted on a fair coin; the
  auditor guesses "in" for its r_in highest scores and "out" for its r_out lowest, abstains on the rest; v of
  its r = r_in + r_out guesses are right. Under (eps, delta)-DP, P[v' >= v] <= P[Binom(r, e^eps/(1+e^eps)) >= v]
  + 2 m delta max_i P[v - i <= Binom < v] / i; the bound is the largest eps that this p-value rejects.
- Gaussian DP (Dong, Roth & Su 2019, Corollary 2.13): mu-GDP is (eps, delta(eps))-DP for every eps, with
  delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2).
- `gdp_mu_lower_bound`: a rigorous mu from one threshold test's false positive and negative rates, each bounded
  by Clopper-Pearson (a mu-GDP mechanism has FNR >= Phi(Phi^-1(1 - FPR) - mu)).
- `one_shot_epsilon`: Andrew et al., "One-shot empirical privacy estimation for federated learning" (ICLR
  2024): inserted canaries' cosines fitted by N(mu_in, s_in^2), unseen ones' by the null N(0, 1/d) (or their own
  fit); eps of distinguishing the two Gaussians at a common std. An estimate, not a bound.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize, special, stats

EPS_CAP = 100.0  # the search range's end: no finite number of guesses can show more


def delta_of_gdp(mu: float, eps: float) -> float:
    """delta(eps) of a mu-GDP mechanism (log domain: stable for large eps)."""
    if mu <= 0:
        return 0.0
    a = stats.norm.logcdf(-eps / mu + mu / 2)
    b = eps + stats.norm.logcdf(-eps / mu - mu / 2)
    return float(np.exp(a) * -np.expm1(min(b - a, 0.0))) if a > -np.inf else 0.0


def epsilon_of_gdp(mu: float, delta: float) -> float:
    """The smallest eps with delta(eps) <= delta for a mu-GDP mechanism."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if mu <= 0 or delta_of_gdp(mu, 0.0) <= delta:
        return 0.0
    return float(optimize.brentq(lambda e: delta_of_gdp(mu, e) - delta, 0.0, 2 * mu * mu + 50 * mu, xtol=1e-10))


def gdp_of_epsilon(eps: float, delta: float) -> float:
    """The mu whose GDP curve passes through (eps, delta): the inverse of `epsilon_of_gdp` in mu."""
    if eps < 0 or not 0 < delta < 1:
        raise ValueError(f"need eps >= 0 and delta in (0, 1), got {eps}, {delta}")
    return float(optimize.brentq(lambda m: delta_of_gdp(m, eps) - delta, 1e-9, 100.0, xtol=1e-12))


def one_run_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[at least v of r guesses right] under (eps, delta)-DP, m canaries (Steinke et al., Appendix D)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    p_right = special.expit(eps)  # e^eps / (1 + e^eps): eps-DP randomized response's accuracy
    beta = stats.binom.sf(v - 1, r, p_right)
    if delta == 0 or v == 0:
        return float(min(beta, 1.0))
    below = np.cumsum(stats.binom.pmf(v - np.arange(1, v + 1), r, p_right))  # P[v - i <= Binom < v], i = 1..v
    alpha = float(np.max(below / np.arange(1, v + 1)))
    return float(min(beta + 2 * m * delta * alpha, 1.0))


def epsilon_from_guesses(m: int, r: int, v: int, delta: float, confidence: float) -> float:
    """The largest eps that v right guesses of r reject at `confidence` (0 when none is rejected)."""
    p = 1.0 - confidence
    if one_run_p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    if one_run_p_value(m, r, v, EPS_CAP, delta) < p:
        return EPS_CAP
    return float(optimize.brentq(lambda e: one_run_p_value(m, r, v, e, delta) - p, 0.0, EPS_CAP, xtol=1e-6))


def one_run_epsilon_lower_bound(scores: np.ndarray, inserted: np.ndarray, delta: float, confidence: float = 0.95,
                                guess_fractions: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)) -> dict:
    """Steinke et al.'s bound from every canary's score (higher: more likely inserted) and its coin.

    The auditor guesses "in" for the top r/2 scores and "out" for the bottom r/2, for r = each fraction of m
    (fixed in advance); the best of these bounds holds at `confidence` by a union bound (Bonferroni)."""
    scores, inserted = np.asarray(scores, np.float64), np.asarray(inserted, bool)
    m = len(scores)
    order = np.argsort(-scores, kind="stable")
    level = 1.0 - (1.0 - confidence) / len(guess_fractions)
    best = {"epsilon": 0.0, "guesses": 0, "correct": 0}
    for frac in guess_fractions:
        half = max(1, int(frac * m) // 2)
        if 2 * half > m:
            half = m // 2
        top, bottom = order[:half], order[m - half:]
        r, v = 2 * half, int(inserted[top].sum() + (~inserted[bottom]).sum())
        eps = epsilon_from_guesses(m, r, v, delta, level)
        if eps > best["epsilon"]:
            best = {"epsilon": eps, "guesses": r, "correct": v}
    return {**best, "canaries": m, "confidence": confidence}


def clopper_pearson_upper(k: int, n: int, confidence: float) -> float:
    """One-sided upper confidence bound on a binomial rate from k of n."""
    return 1.0 if k >= n else float(stats.beta.ppf(confidence, k + 1, n - k))


def gdp_mu_lower_bound(scores_in: np.ndarray, scores_out: np.ndarray, threshold: float,
                       confidence: float = 0.95) -> float:
    """A lower bound on mu from the test "inserted iff score > threshold" (threshold fixed before these scores
    are seen): FPR and FNR each bounded above at sqrt(confidence), so both hold at `confidence`."""
    scores_in, scores_out = np.asarray(scores_in), np.asarray(scores_out)
    level = math.sqrt(confidence)
    fpr = clopper_pearson_upper(int(np.sum(scores_out > threshold)), len(scores_out), level)
    fnr = clopper_pearson_upper(int(np.sum(scores_in <= threshold)), len(scores_in), level)
    return max(0.0, float(stats.norm.isf(fpr) - stats.norm.ppf(fnr)))


def one_shot_epsilon(scores_in: np.ndarray, delta: float, dim: int | None = None,
                     scores_out: np.ndarray | None = None) -> dict:
    """Andrew et al.'s estimate: mu = (mean_in - mean_null) / std_in, eps its GDP epsilon at delta. The null is
    N(0, 1/dim) for cosines with random unit vectors in `dim` dimensions, or the unseen canaries' own fit."""
    scores_in = np.asarray(scores_in, np.float64)
    if scores_out is not None and len(scores_out) > 1:
        null_mean, null_std = float(np.mean(scores_out)), float(np.std(scores_out, ddof=1))
    elif dim:
        null_mean, null_std = 0.0, 1.0 / math.sqrt(dim)
    elif scores_out is not None:  # one unseen canary or none: no null to fit; no estimate, not a crash
        return {"epsilon": None, "mu": None, "note": f"{len(scores_out)} unseen canaries: too few to fit the null"}
    else:
        raise ValueError("one_shot_epsilon needs the unseen canaries' scores or the dimension of the null")
    if len(scores_in) < 2:  # one score has no spread: no estimate (never an infinite one)
        return {"epsilon": None, "mu": None, "note": f"{len(scores_in)} inserted canaries: too few to fit"}
    mean_in, std_in = float(np.mean(scores_in)), float(np.std(scores_in, ddof=1))
    if std_in > 0:
        mu = max(0.0, (mean_in - null_mean) / std_in)
    else:  # every inserted canary scored the same: perfectly separated if above the null's mean, else nothing
        mu = math.inf if mean_in > null_mean else 0.0
    eps = epsilon_of_gdp(mu, delta) if math.isfinite(mu) else math.inf
    return {"epsilon": eps, "mu": mu, "mean_inserted": mean_in, "std_inserted": std_in, "mean_null": null_mean,
            "std_null": null_std}
