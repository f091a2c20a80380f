"""The server's check of a client's sample-level DP report: epsilon is recomputed, never taken on trust.

A client reports ``{"epsilon", "noise_multiplier", "sample_rate", "dp_steps", "accountant": {"kind",
"history": [[sigma, q, steps], ...]}}`` (``dp.SamplePrivacy.report``). `verify_report` parses every field and
every history entry, checks that the history continues the last verified one by exactly the steps the server
asked for, recomputes epsilon from the history with the server's own accountant and refuses a claim that
disagrees. What it returns, a `VerifiedReport`, is rebuilt from parsed values only: nothing the client sent
reaches the metrics or the checkpoint unparsed.

Bounded work whatever a client sends: the history is at most `MAX_HISTORY` entries, merged by (sigma, q)
before any accounting (an honest history has one (sigma, q) pair; Opacus composes steps of one pair by
multiplication, so merging changes nothing), at most `MAX_PAIRS` distinct pairs, sigma at most
`MAX_NOISE_MULTIPLIER`; the RDP of one step of each pair is cached, and the PRV accountant's discretisation
grid is sized before it is allocated. bench/bench_report_check.py measures it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.analysis.prv import (
    Domain,
    PoissonSubsampledGaussianPRV,
    TruncatedPrivacyRandomVariable,
    compose_heterogeneous,
    discretize,
)

__all__ = ["MAX_HISTORY", "MAX_PAIRS", "VerifiedReport", "server_epsilon", "verify_report"]

MAX_HISTORY = 100_000  # entries a report's history may hold (a 1 MiB JSON report holds about 80,000)
MAX_PAIRS = 2  # distinct (sigma, q) pairs after merging; an honest client has one for the whole run
# Above this, epsilon is ~0 (sigma 1e4 reaches epsilon 0.02 only after ~1e5 full-batch steps) and one RDP
# evaluation near q = 0.5 takes seconds.
MAX_NOISE_MULTIPLIER = 1e4
MAX_STEPS = 10**9  # DP steps of one client over a whole run
MAX_PRV_GRID = 4_000_000  # points of the PRV accountant's discretisation (8 bytes each, a few arrays)
TOLERANCE = 1e-3  # relative disagreement allowed between the claimed and the server's epsilon
ACCOUNTANTS = ("rdp", "prv")

Pair = tuple[float, float]  # (noise multiplier, sample rate)


@dataclass(frozen=True)
class VerifiedReport:
    """A report the server checked, holding only parsed values; `epsilon` is the server's own."""

    epsilon: float
    noise_multiplier: float
    sample_rate: float
    dp_steps: int
    accountant: str
    history: tuple[tuple[float, float, int], ...]  # merged: one entry per (sigma, q), first-seen order

    def to_dict(self) -> dict:
        """The stored form, shaped like the client's report (metrics and the downlink read it so)."""
        return {"epsilon": self.epsilon, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "dp_steps": self.dp_steps,
                "accountant": {"kind": self.accountant, "history": [[s, q, n] for s, q, n in self.history]}}

    @classmethod
    def from_dict(cls, d) -> "VerifiedReport":
        """Back from `to_dict` (a checkpoint); every field is parsed again. ValueError on anything else."""
        if not isinstance(d, dict) or not isinstance(d.get("accountant"), dict):
            raise ValueError("stored privacy report is not an object with an accountant")
        kind = d["accountant"].get("kind")
        if kind not in ACCOUNTANTS:
            raise ValueError(f"stored privacy report: unknown accountant {str(kind)[:20]!r}")
        parsed = _parse_fields(d)
        if isinstance(parsed, str):
            raise ValueError(f"stored {parsed}")
        eps = d.get("epsilon")
        if not _is_epsilon(eps):
            raise ValueError(f"stored privacy report: epsilon {str(eps)[:30]} is not a number >= 0")
        sigma, q, steps, history = parsed
        return cls(float(eps), sigma, q, steps, kind, history)


def verify_report(report, previous: VerifiedReport | None, *, delta: float, accountant: str, expected_steps: int,
                  max_steps: int | None = None, expected_pair: Pair | None = None,
                  tolerance: float = TOLERANCE) -> VerifiedReport | str:
    """The checked report of one client, or why it is refused (one line).

    - `previous`: this client's last verified report (None before its first).
    - `expected_steps`: the DP steps this round asked of it (local steps if it trained).
    - `max_steps`: the most steps it can have taken in the whole run (train instructions x local steps), when
      replies of earlier rounds may have been lost; None: exactly previous steps + `expected_steps`.
    - `expected_pair`: the (sigma, q) the server knows the client trains with; None: any valid pair.
    The history must hold the previous one, and every new step at the report's (sigma, q).
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")  # the server's own bug
    if not isinstance(report, dict):
        return "privacy report missing or not an object"
    acc = report.get("accountant")
    if not isinstance(acc, dict) or acc.get("kind") != accountant:
        return f"privacy report: accountant is not the server's {accountant!r}"
    parsed = _parse_fields(report)
    if isinstance(parsed, str):
        return parsed
    sigma, q, steps, history = parsed
    claim = report.get("epsilon")
    if not _is_epsilon(claim):
        return f"privacy report: epsilon {str(claim)[:30]} is not a number >= 0"
    before = previous.dp_steps if previous is not None else 0
    low = before + int(expected_steps)
    high = low if max_steps is None else int(max_steps)
    if not low <= steps <= high:
        want = f"{low}" if low == high else f"{low}..{high}"
        return f"privacy report: {steps} DP steps, the server expects {want}"
    added = dict(((s, q_), n) for s, q_, n in history)
    for s, q_, n in previous.history if previous is not None else ():
        if added.get((s, q_), 0) < n:
            return "privacy report: its history drops steps of its previous report"
        added[(s, q_)] -= n
    if any(n and pair != (sigma, q) for pair, n in added.items()):
        return "privacy report: new steps at another (noise_multiplier, sample_rate) than the report's"
    if expected_pair is not None and steps > before and not (
            math.isclose(sigma, expected_pair[0], rel_tol=1e-9) and math.isclose(q, expected_pair[1], rel_tol=1e-9)):
        return f"privacy report: trains at sigma={sigma:.6g}, q={q:.6g}, the server expects " \
               f"sigma={expected_pair[0]:.6g}, q={expected_pair[1]:.6g}"
    eps = server_epsilon(history, delta, accountant)
    if isinstance(eps, str):
        return eps
    if not (claim == eps if math.isinf(eps) or math.isinf(claim)
            else math.isclose(claim, eps, rel_tol=tolerance, abs_tol=1e-9)):
        return f"privacy report: claims epsilon {claim:.6g}, its history gives {eps:.6g}"
    return VerifiedReport(eps, sigma, q, steps, accountant, history)


def server_epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float | str:
    """Epsilon at `delta` of a parsed, merged history (Opacus' accountant `accountant`); a reason string when the
    history is beyond what the server computes (a PRV grid too large)."""
    if not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")  # the server's own config
    history = tuple((s, q, n) for s, q, n in history if n > 0)
    if not history:
        return 0.0
    if any(s == 0 for s, _, _ in history):
        return math.inf  # no noise, no privacy (Opacus' formulas divide by sigma)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # RDP warns when the best order is the largest alpha
        eps = _rdp_epsilon(history, delta) if accountant == "rdp" else _prv_epsilon(history, delta)
    if isinstance(eps, str):
        return eps
    if math.isnan(eps):
        return "privacy report: its history gives no epsilon (NaN)"
    return max(0.0, eps)


# -- parsing -----------------------------------------------------------------------------------------------------
def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _bad_pair(sigma, q) -> str | None:
    # Plain comparisons: they are exact for integers of any size (math.isfinite(10**400) raises) and NaN fails them.
    if not _is_number(sigma) or not 0 <= sigma <= MAX_NOISE_MULTIPLIER:
        return f"noise_multiplier {str(sigma)[:30]} is not a number in 0..{MAX_NOISE_MULTIPLIER:g}"
    if not _is_number(q) or not 0 < q <= 1:
        return f"sample_rate {str(q)[:30]} is not a number in (0, 1]"
    return None


def _is_epsilon(x) -> bool:
    """A number >= 0, finite (below float's range) or infinite; not NaN."""
    return _is_number(x) and (x == math.inf or 0 <= x < 1e308)


def _is_steps(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_STEPS


def _parse_fields(d: dict):
    """(sigma, q, steps, merged history) of a report-shaped dict, or why not (one line)."""
    sigma, q, steps = d.get("noise_multiplier"), d.get("sample_rate"), d.get("dp_steps")
    why = _bad_pair(sigma, q)
    if why:
        return f"privacy report: {why}"
    if not _is_steps(steps):
        return f"privacy report: dp_steps {str(steps)[:30]} is not an integer in 0..{MAX_STEPS}"
    raw = d["accountant"].get("history")
    if not isinstance(raw, list) or len(raw) > MAX_HISTORY:
        return f"privacy report: history is not a list of at most {MAX_HISTORY} entries"
    merged: dict[Pair, int] = {}
    for i, entry in enumerate(raw):
        if not isinstance(entry, list) or len(entry) != 3:
            return f"privacy report: history entry {i} is not [noise_multiplier, sample_rate, steps]"
        s, r, n = entry
        why = _bad_pair(s, r) or (None if _is_steps(n) else f"steps {str(n)[:30]} is not an integer >= 0")
        if why:
            return f"privacy report: history entry {i}: {why}"
        key = (float(s), float(r))
        merged[key] = merged.get(key, 0) + n
        if len(merged) > MAX_PAIRS:
            return f"privacy report: history has more than {MAX_PAIRS} distinct (noise_multiplier, sample_rate)"
    history = tuple((s, r, n) for (s, r), n in merged.items() if n)
    total = sum(n for _, _, n in history)
    if total != steps:
        return f"privacy report: dp_steps {steps} differs from its history's {total}"
    return float(sigma), float(q), steps, history


# -- accounting (Opacus) -----------------------------------------------------------------------------------------
@lru_cache(maxsize=4096)
def _rdp_of_one_step(sigma: float, q: float) -> np.ndarray:
    """Opacus' RDP of one subsampled Gaussian step at its default orders. Cached: a client's pair is evaluated
    once per run, not once per report (one evaluation can take a second for large sigma near q = 0.5)."""
    out = np.asarray(rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1,
                                              orders=RDPAccountant.DEFAULT_ALPHAS), dtype=np.float64)
    out.setflags(write=False)
    return out


def _rdp_epsilon(history, delta: float) -> float:
    # RDPAccountant.get_privacy_spent's composition (a sum of per-pair RDP times steps), written out so the
    # per-pair part comes from the cache; the conversion to epsilon is Opacus' own.
    rdp = sum(_rdp_of_one_step(s, q) * n for s, q, n in history)
    eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


def _prv_half_width(history, eps_error: float, delta_error: float) -> float:
    """Opacus' `compute_safe_domain_size` (the PRV grid's half-width L) from the cached per-pair RDP: sizing the
    grid of a crafted history costs no fresh RDP evaluation of a pair seen before."""
    total = sum(n for _, _, n in history)
    half = _rdp_epsilon(history, delta_error / 4)
    for s, q, _ in history:
        half = max(half, _rdp_epsilon(((s, q, 1),), delta_error / (8 * total)))
    return max(half, eps_error) + 3


def _prv_epsilon(history, delta: float) -> float | str:
    """PRVAccountant.get_epsilon at its defaults, step by step with Opacus' own PRV functions (as its
    `_get_dprv`), so that the grid is sized before it is allocated (a crafted pair, tiny sigma and q, would
    ask for terabytes) and the grid's half-width comes from the per-pair RDP cache."""
    eps_error, delta_error = 0.01, delta / 1000
    counts = [n for _, _, n in history]
    half = _prv_half_width(history, eps_error, delta_error)
    mesh = eps_error / math.sqrt(sum(counts) * math.log(12 / delta_error) / 2)
    points = 2 * half / mesh
    if not math.isfinite(points) or points > MAX_PRV_GRID:
        return f"privacy report: its history needs a PRV grid of {points:.3g} points (limit {MAX_PRV_GRID:g})"
    domain = Domain.create_aligned(-half, half, mesh)
    prvs = [PoissonSubsampledGaussianPRV(q, s) for s, q, _ in history]
    dprvs = [discretize(TruncatedPrivacyRandomVariable(p, domain.t_min, domain.t_max), domain) for p in prvs]
    composed = compose_heterogeneous(dprvs=dprvs, num_self_compositions=counts)
    return float(composed.compute_epsilon(delta, delta_error, eps_error)[2])  # the upper bound, as Opacus
