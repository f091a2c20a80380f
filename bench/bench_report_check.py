"""Time the server's check of one sample-level DP report (fedlora.privacy.report_check.verify_report) against
a naive Opacus recomputation of the history as sent, for honest and crafted histories.

    python bench/bench_report_check.py [--quick]

The naive column feeds the history, unmerged, to Opacus' accountant (what taking every entry at face value
costs). For long histories it is measured on the first `--sample` entries and scaled linearly (Opacus'
accountants evaluate each entry separately), marked "~". Cold: the per-pair RDP cache cleared first; warm: the
same report checked again (a client's pair is evaluated once per run).
"""

from __future__ import annotations

import argparse
import time
import warnings

from opacus.accountants import PRVAccountant, RDPAccountant

from fedlora.privacy import report_check
from fedlora.privacy.report_check import VerifiedReport, verify_report

DELTA = 1e-5


def report(history: list, kind: str, sigma: float, q: float) -> dict:
    steps = sum(n for _, _, n in history)
    return {"epsilon": 0.0, "noise_multiplier": sigma, "sample_rate": q, "dp_steps": steps,
            "accountant": {"kind": kind, "history": [list(e) for e in history]}}


def naive_seconds(history: list, kind: str, sample: int) -> tuple[float, bool]:
    part = history[:sample]
    acc = (RDPAccountant if kind == "rdp" else PRVAccountant)()
    acc.history = [tuple(e) for e in part]
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            acc.get_epsilon(DELTA)
    except (MemoryError, ValueError, OverflowError):
        pass
    return (time.perf_counter() - start) * len(history) / len(part), len(part) < len(history)


def previous_of(history: list, kind: str, sigma: float, q: float) -> VerifiedReport | None:
    """A previous report holding every step at a pair other than the report's: the new steps are all at the
    report's pair, so a multi-pair history passes the continuity check and is accounted in full."""
    others: dict = {}
    for s, r, n in history:
        if (s, r) != (sigma, q):
            others[(s, r)] = others.get((s, r), 0) + n
    if not others:
        return None
    return VerifiedReport(0.0, sigma, q, sum(others.values()), kind, tuple((s, r, n) for (s, r), n in others.items()))


def check_seconds(rep: dict, kind: str, previous: VerifiedReport | None) -> tuple[float, float, str]:
    report_check._rdp_of_one_step.cache_clear()
    times, outcome = [], ""
    new = rep["dp_steps"] - (previous.dp_steps if previous else 0)
    for _ in range(2):
        start = time.perf_counter()
        got = verify_report(rep, previous, delta=DELTA, accountant=kind, expected_steps=new)
        times.append(time.perf_counter() - start)
        # The claim is 0: a refusal naming the server's epsilon means the whole history was accounted.
        outcome = got if isinstance(got, str) else "verified"
    return times[0], times[1], outcome


def cases(n: int) -> list[tuple[str, str, list, float, float]]:
    k = report_check.MAX_PAIRS
    slow = [(1e4, 0.5), (1e4, 0.4999), (1e4, 0.5001), (5e3, 0.5)][:k]  # the slowest RDP pairs below the sigma cap
    plain = [(1.0, 0.05), (1.3, 0.05), (2.0, 0.1), (0.8, 0.02)][:k]
    return [
        ("honest, 1 entry", "rdp", [(1.0, 0.05, 500)], 1.0, 0.05),
        ("honest, 1 entry", "prv", [(1.0, 0.05, 500)], 1.0, 0.05),
        (f"{n:,} identical entries", "rdp", [(1.0, 0.05, 1)] * n, 1.0, 0.05),
        (f"{n:,} identical entries", "prv", [(3.0, 0.01, 1)] * n, 3.0, 0.01),
        (f"{n:,} entries, {k} pairs", "rdp", [(s, q, 1) for _ in range(n // k) for s, q in plain], 1.0, 0.05),
        (f"{n:,} entries, {k} slowest pairs", "rdp", [(s, q, 1) for _ in range(n // k) for s, q in slow], 1e4, 0.5),
        (f"{n:,} entries, {k} slowest pairs", "prv", [(s, q, 1) for _ in range(n // k) for s, q in slow], 1e4, 0.5),
        (f"{n:,} distinct pairs", "rdp", [(1.0 + i * 1e-6, 0.05, 1) for i in range(n)], 1.0, 0.05),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8,000-entry histories instead of 80,000")
    parser.add_argument("--sample", type=int, default=40, help="entries the naive column is measured on")
    args = parser.parse_args()
    n = 8_000 if args.quick else 80_000
    print(f"{'history':32} {'acct':4} {'naive Opacus s':>15} {'check cold s':>13} {'check warm s':>13}  outcome")
    for name, kind, history, sigma, q in cases(n):
        naive, scaled = naive_seconds(history, kind, args.sample)
        previous = previous_of(history, kind, sigma, q)
        cold, warm, outcome = check_seconds(report(history, kind, sigma, q), kind, previous)
        outcome = "refused: " + outcome.removeprefix("privacy report: ") if outcome != "verified" else outcome
        print(f"{name:32} {kind:4} {('~' if scaled else '') + f'{naive:.3g}':>15} {cold:13.3f} {warm:13.3f}  "
              f"{outcome[:70]}")


if __name__ == "__main__":
    main()
