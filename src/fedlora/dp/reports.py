"""The privacy reports clients send under sample-level DP: what makes one malformed."""

from __future__ import annotations

import math

from fedlora.privacy import ClientAccountant

MAX_HISTORY = 100_000  # accountant history entries a report may carry


def check_privacy_report(report, previous: dict | None) -> str | None:
    """Why a client's sample-level DP report is malformed, or None. Its numbers are logged as the client's
    epsilon: they must be finite, typed and consistent with its accountant state."""
    if not isinstance(report, dict):
        return "privacy report missing or not an object"
    try:
        eps, sigma, q, steps = (report[k] for k in ("epsilon", "noise_multiplier", "sample_rate", "dp_steps"))
        acc = report["accountant"]
    except KeyError as exc:
        return f"privacy report lacks {exc}"
    for name, x in (("epsilon", eps), ("noise_multiplier", sigma), ("sample_rate", q)):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
            return f"privacy report: {name} {x!r} is not a finite number >= 0"
    if not 0 < q <= 1:
        return f"privacy report: sample_rate {q!r} outside (0, 1]"
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= 10**9:
        return f"privacy report: dp_steps {steps!r} is not an integer in 0..1e9"
    if not isinstance(acc, dict) or not isinstance(acc.get("history"), list) or len(acc["history"]) > MAX_HISTORY:
        return "privacy report: malformed accountant state"
    try:
        accountant = ClientAccountant.from_state_dict(acc)
        if accountant.total_steps != steps:
            return f"privacy report: dp_steps {steps} differs from its accountant's {accountant.total_steps}"
    except (ValueError, TypeError, OverflowError):
        return "privacy report: malformed accountant state"
    if previous is not None and steps < previous.get("dp_steps", 0):
        return f"privacy report: dp_steps went back from {previous['dp_steps']} to {steps}"
    return None
