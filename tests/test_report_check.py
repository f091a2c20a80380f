"""The server's check of sample-level DP reports (fedlora.privacy.report_check): epsilon is recomputed from the
reported history with the server's own accountant, every field is parsed, crafted histories are answered in
bounded time, and only parsed values come out (issue 26, items 1 and 2)."""

from __future__ import annotations

import functools
import json
import math
import time

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant

from fedlora.privacy import ClientAccountant
from fedlora.privacy import report_check
from fedlora.privacy.report_check import MAX_PAIRS, VerifiedReport, verify_report

DELTA = 1e-5
SIGMA, Q, STEPS = 0.6, 0.2, 40  # an honest pair: epsilon about 27 (RDP) after one round


def honest(kind: str = "rdp", rounds: int = 1, sigma: float = SIGMA, q: float = Q, steps: int = STEPS) -> dict:
    """What `dp.SamplePrivacy.report` sends after `rounds` rounds, through JSON as on the wire (a fresh copy)."""
    return json.loads(_honest_text(kind, rounds, sigma, q, steps))


@functools.cache
def _honest_text(kind: str, rounds: int, sigma: float, q: float, steps: int) -> str:
    acc = ClientAccountant(kind)
    for _ in range(rounds):
        acc.step(sigma, q, steps)
    return json.dumps({"epsilon": acc.epsilon(DELTA), "noise_multiplier": sigma, "sample_rate": q,
                       "dp_steps": acc.total_steps, "accountant": acc.state_dict()})


def check(report, previous=None, kind="rdp", expected=STEPS, **kw):
    return verify_report(report, previous, delta=DELTA, accountant=kind, expected_steps=expected, **kw)


def refused(result, fragment: str) -> None:
    assert isinstance(result, str), result
    assert fragment in result and "\n" not in result, result


# -- forged epsilon -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_an_honest_report_is_verified_with_the_servers_epsilon(kind):
    rep = honest(kind)
    got = check(rep, kind=kind)
    assert isinstance(got, VerifiedReport)
    assert got.epsilon == ClientAccountant(kind, [(SIGMA, Q, STEPS)]).epsilon(DELTA)
    assert (got.noise_multiplier, got.sample_rate, got.dp_steps, got.history) == (SIGMA, Q, STEPS, ((SIGMA, Q, STEPS),))
    second = check(honest(kind, rounds=2), got, kind=kind)
    assert isinstance(second, VerifiedReport) and second.dp_steps == 2 * STEPS and second.epsilon > got.epsilon


@pytest.mark.parametrize("claim", [0.001, 0.0, 1.0, math.inf])
def test_a_forged_claim_is_refused_naming_the_servers_epsilon(claim):
    rep = honest()
    truth = rep["epsilon"]
    assert truth > 10
    rep["epsilon"] = claim
    refused(check(rep), f"its history gives {truth:.6g}")


def test_a_round_two_report_repeating_round_ones_epsilon_is_refused():
    first = check(honest())
    rep = honest(rounds=2)
    rep["epsilon"] = first.epsilon
    refused(check(rep, first), "claims epsilon")


def test_zero_noise_means_infinite_epsilon():
    rep = honest()
    rep["noise_multiplier"] = 0.0
    rep["accountant"]["history"] = [[0.0, Q, STEPS]]
    rep["epsilon"] = 0.5
    refused(check(rep), "its history gives inf")
    rep["epsilon"] = math.inf  # the honest claim (JSON Infinity)
    got = check(json.loads(json.dumps(rep)))
    assert isinstance(got, VerifiedReport) and got.epsilon == math.inf


def test_a_claim_within_the_tolerance_passes_and_the_server_keeps_its_own_value():
    rep = honest()
    truth = rep["epsilon"]
    rep["epsilon"] = truth * (1 - report_check.TOLERANCE / 2)
    got = check(rep)
    assert isinstance(got, VerifiedReport) and got.epsilon == truth
    rep["epsilon"] = truth * (1 - 2 * report_check.TOLERANCE)
    refused(check(rep), "claims epsilon")


# -- every field, every entry ----------------------------------------------------------------------------------
@pytest.mark.parametrize("entry,fragment", [
    ([SIGMA, Q, -5], "steps -5"), ([SIGMA, 1.5, STEPS], "sample_rate 1.5"), ([SIGMA, 0.0, STEPS], "sample_rate 0.0"),
    ([-1.0, Q, STEPS], "noise_multiplier -1.0"), ([math.nan, Q, STEPS], "noise_multiplier nan"),
    ([math.inf, Q, STEPS], "noise_multiplier inf"), ([SIGMA, Q, 2.0], "steps 2.0"), ([SIGMA, Q, True], "steps True"),
    ([True, Q, STEPS], "noise_multiplier True"), (["1", Q, STEPS], "noise_multiplier 1"), ([SIGMA, Q], "entry 0"),
    ({"s": 1}, "entry 0"), ([SIGMA, Q, 10**30], "steps 1000"), ([1e9, Q, STEPS], "noise_multiplier 1000000000"),
    ([10**400, Q, STEPS], "noise_multiplier 1000"), ([SIGMA, 10**400, STEPS], "sample_rate 1000"),
])
def test_every_history_entry_is_validated(entry, fragment):
    rep = honest()
    rep["accountant"]["history"] = [entry]
    refused(check(rep), fragment)


@pytest.mark.parametrize("field,value,fragment", [
    ("epsilon", math.nan, "epsilon nan"), ("epsilon", -1.0, "epsilon -1.0"), ("epsilon", "1", "epsilon 1"),
    ("epsilon", None, "epsilon None"), ("epsilon", True, "epsilon True"), ("epsilon", 10**400, "epsilon 1000"),
    ("noise_multiplier", 10**400, "noise_multiplier 1000"), ("sample_rate", -(10**400), "sample_rate -1000"),
    ("noise_multiplier", -0.5, "noise_multiplier -0.5"), ("sample_rate", 2, "sample_rate 2"),
    ("dp_steps", -1, "dp_steps -1"), ("dp_steps", 40.0, "dp_steps 40.0"), ("dp_steps", 41, "differs from its history"),
    ("accountant", {"kind": "prv", "history": [[SIGMA, Q, STEPS]]}, "not the server's 'rdp'"),
    ("accountant", {"kind": "rdp", "history": "x"}, "history is not a list"),
    ("accountant", {"kind": "rdp", "history": [[SIGMA, Q, 1]] * (report_check.MAX_HISTORY + 1)}, "at most"),
    ("accountant", None, "accountant"),
])
def test_every_report_field_is_validated(field, value, fragment):
    rep = honest()
    rep[field] = value
    refused(check(rep), fragment)


@pytest.mark.parametrize("report", [None, [], "x", 3, {}])
def test_a_report_that_is_not_an_object_is_refused(report):
    assert isinstance(check(report), str)


def test_the_steps_must_be_what_the_round_asked_for():
    first = check(honest())
    refused(check(honest(rounds=2), first, expected=STEPS + 1), f"the server expects {2 * STEPS + 1}")
    refused(check(honest(rounds=1), first), f"the server expects {2 * STEPS}")  # no new steps: a replay
    refused(check(honest(rounds=3), first), f"the server expects {2 * STEPS}")
    # A lost reply of an earlier round: more steps than this round's are fine up to what the server ever asked.
    assert isinstance(check(honest(rounds=3), first, max_steps=3 * STEPS), VerifiedReport)
    refused(check(honest(rounds=4), first, max_steps=3 * STEPS), f"expects {2 * STEPS}..{3 * STEPS}")


def test_the_history_must_continue_the_previous_one():
    first = check(honest(sigma=SIGMA))
    # The same step count, but the past rewritten at a much larger sigma: epsilon would drop.
    rewritten = honest(sigma=50.0, rounds=2)
    refused(check(rewritten, first), "drops steps of its previous report")
    # New steps at a pair other than the one the report names.
    rep = honest(rounds=2)
    rep["accountant"]["history"] = [[SIGMA, Q, STEPS], [SIGMA, 0.9, STEPS]]
    rep["epsilon"] = ClientAccountant("rdp", [(SIGMA, Q, STEPS), (SIGMA, 0.9, STEPS)]).epsilon(DELTA)
    refused(check(rep, first), "new steps at another")


def test_an_expected_pair_pins_sigma_and_q():
    assert isinstance(check(honest(), expected_pair=(SIGMA, Q)), VerifiedReport)
    refused(check(honest(sigma=5.0), expected_pair=(SIGMA, Q)), "the server expects sigma=0.6")


def test_a_reply_with_no_steps_is_fine_when_none_were_asked():
    rep = {"epsilon": 0.0, "noise_multiplier": SIGMA, "sample_rate": Q, "dp_steps": 0,
           "accountant": {"kind": "rdp", "history": []}}
    got = check(rep, expected=0)
    assert isinstance(got, VerifiedReport) and got.epsilon == 0.0 and got.history == ()


# -- bounded work -----------------------------------------------------------------------------------------------
def test_an_80000_entry_history_is_answered_in_bounded_time():
    """A naive Opacus recomputation evaluates every entry (minutes, see bench/bench_report_check.py); merged,
    it is one evaluation per distinct pair, at most MAX_PAIRS."""
    report_check._rdp_of_one_step.cache_clear()
    pairs = [(1.3, 0.05), (SIGMA, Q)]
    history = [[s, q, 1] for _ in range(40_000) for s, q in pairs]
    merged = tuple((s, q, 40_000) for s, q in pairs)
    previous = VerifiedReport(0.0, SIGMA, Q, 40_000 + 39_900, "rdp",
                              tuple((s, q, n if (s, q) != (SIGMA, Q) else n - 100) for s, q, n in merged))
    acc = RDPAccountant()
    acc.history = list(merged)
    rep = {"epsilon": acc.get_epsilon(DELTA), "noise_multiplier": SIGMA, "sample_rate": Q, "dp_steps": 80_000,
           "accountant": {"kind": "rdp", "history": history}}
    start = time.perf_counter()
    got = check(rep, previous, expected=100)
    assert time.perf_counter() - start < 30.0  # a safety net only; the measured time is in the bench
    assert isinstance(got, VerifiedReport) and got.history == merged and got.epsilon == pytest.approx(rep["epsilon"])
    # More distinct pairs than any honest client has: refused before any accounting.
    rep["accountant"]["history"] = [[1.0 + i * 1e-6, Q, 1] for i in range(80_000)]
    start = time.perf_counter()
    refused(check(rep, None, expected=80_000), f"more than {MAX_PAIRS} distinct")
    assert time.perf_counter() - start < 30.0


def test_a_prv_history_that_would_need_a_huge_grid_is_refused_quickly():
    rep = {"epsilon": 1.0, "noise_multiplier": 0.001, "sample_rate": 1e-9, "dp_steps": 5,
           "accountant": {"kind": "prv", "history": [[0.001, 1e-9, 5]]}}  # Opacus would ask for ~32 GB
    start = time.perf_counter()
    refused(check(rep, kind="prv", expected=5), "PRV grid")
    assert time.perf_counter() - start < 30.0


def test_merging_gives_opacus_epsilon_for_the_unmerged_history():
    history = [(SIGMA, Q, 3), (1.5, 0.1, 2), (SIGMA, Q, 4), (1.5, 0.1, 1)]
    merged = report_check._parse_fields({"noise_multiplier": SIGMA, "sample_rate": Q, "dp_steps": 10,
                                         "accountant": {"history": [list(e) for e in history]}})[3]
    assert merged == ((SIGMA, Q, 7), (1.5, 0.1, 3))
    for kind in ("rdp", "prv"):
        ours = report_check.server_epsilon(merged, DELTA, kind)
        assert ours == pytest.approx(ClientAccountant(kind, history).epsilon(DELTA), rel=report_check.TOLERANCE / 2)


# -- what is stored -----------------------------------------------------------------------------------------------
def test_only_parsed_fields_are_kept():
    rep = honest()
    rep["__array__"] = "a0"  # a checkpoint marker smuggled in a report
    rep["accountant"]["__factors__"] = [1, 2, 3]
    got = check(rep)
    stored = got.to_dict()
    assert set(stored) == {"epsilon", "noise_multiplier", "sample_rate", "dp_steps", "accountant"}
    assert set(stored["accountant"]) == {"kind", "history"}
    assert VerifiedReport.from_dict(json.loads(json.dumps(stored))) == got
    # The stored form is what the client reads back after a resume (dp.SamplePrivacy, ClientAccountant).
    assert ClientAccountant.from_state_dict(stored["accountant"]).total_steps == STEPS


@pytest.mark.parametrize("mutate", [
    lambda d: d.update(epsilon=-1.0), lambda d: d.update(epsilon=math.nan), lambda d: d.update(dp_steps=3),
    lambda d: d["accountant"].update(kind="x"), lambda d: d["accountant"].update(history=[[1, 2, 3]]),
    lambda d: d.pop("accountant"),
])
def test_a_damaged_stored_report_is_a_value_error(mutate):
    stored = check(honest()).to_dict()
    mutate(stored)
    with pytest.raises(ValueError):
        VerifiedReport.from_dict(stored)


# -- property: any report ---------------------------------------------------------------------------------------
# Pairs from a small set (the per-pair RDP cache keeps the test fast), extreme ones included.
sigmas = st.sampled_from([0.0, 1e-6, 0.3, SIGMA, 1.0, 4.0, 1e4, -1.0, math.nan, math.inf, 1e9, True, "1", None,
                          10**400, 1])
rates = st.sampled_from([1e-12, 1e-4, Q, 0.5, 1.0, 0.0, 1.5, -0.1, math.nan, False, None, 10**400, 1])
counts = st.one_of(st.integers(-3, 60), st.sampled_from([10**12, 2.0, True, None, "3"]))
entries = st.one_of(st.lists(st.one_of(sigmas, rates, counts), min_size=3, max_size=3),
                    st.tuples(sigmas, rates, counts).map(list), st.just([1.0]), st.just("x"))
claims = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([None, True, "1", -1, 10**400, 0, 26]))


@functools.cache
def reference_epsilon(kind: str, history: tuple) -> float:
    return ClientAccountant(kind, list(history)).epsilon(DELTA)


@functools.cache
def first_report(kind: str, sigma: float, q: float) -> VerifiedReport:
    return check(honest(kind, sigma=sigma, q=q), kind=kind)


@st.composite
def cases(draw):
    """(report, accountant, previous verified report, steps asked): an honest client's report of one or two
    rounds (with the round's own step count, or another), then 0-2 edits; or a report built from scratch."""
    kind = draw(st.sampled_from(["rdp", "rdp", "rdp", "prv"]))
    previous, expected = None, draw(st.sampled_from([0, STEPS, 2 * STEPS]))
    if draw(st.booleans()):
        sigma, q = draw(st.sampled_from([SIGMA, 1.0, 4.0])), draw(st.sampled_from([Q, 0.5, 1e-4]))
        rep = honest(kind, rounds=draw(st.integers(1, 2)), sigma=sigma, q=q)
        if rep["dp_steps"] == 2 * STEPS and draw(st.booleans()):
            previous = first_report(kind, sigma, q)
        if draw(st.integers(0, 3)):  # mostly the steps the round really asked for
            expected = rep["dp_steps"] - (previous.dp_steps if previous else 0)
    else:
        rep = {"epsilon": draw(claims), "noise_multiplier": draw(sigmas), "sample_rate": draw(rates),
               "dp_steps": draw(counts), "accountant": {"kind": draw(st.sampled_from(["rdp", "prv", None])),
                                                         "history": draw(st.lists(entries, max_size=4))}}
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(["epsilon", "noise_multiplier", "sample_rate", "dp_steps", "history", "drop"]))
        if key == "history":
            rep["accountant"]["history"].append(draw(entries))
        elif key == "drop":
            rep.pop(draw(st.sampled_from(sorted(rep))), None)
        else:
            rep[key] = draw({"epsilon": claims, "noise_multiplier": sigmas, "sample_rate": rates,
                             "dp_steps": counts}[key])
    return rep, kind, previous, expected


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_any_report_is_verified_or_refused_never_raises(case):
    rep, kind, previous, expected = case
    got = check(rep, previous, kind=kind, expected=expected)
    event("verified" if isinstance(got, VerifiedReport) else "refused")
    if isinstance(got, str):
        assert got and "\n" not in got
        return
    # Accepted: every number is the parsed one and epsilon is the accountant's own for that history.
    assert got.dp_steps == (previous.dp_steps if previous else 0) + expected
    assert got.epsilon == pytest.approx(reference_epsilon(kind, got.history), rel=report_check.TOLERANCE / 2)
    claim = rep["epsilon"]
    assert claim == got.epsilon or math.isclose(claim, got.epsilon, rel_tol=report_check.TOLERANCE, abs_tol=1e-9)
    assert VerifiedReport.from_dict(json.loads(json.dumps(got.to_dict()))) == got
    forged = dict(rep, epsilon=got.epsilon * 0.5 if 0 < got.epsilon < math.inf else 1.0)
    assert isinstance(check(forged, previous, kind=kind, expected=expected), str)


def test_the_prv_grid_is_sized_as_opacus_sizes_it():
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size

    for history in (((SIGMA, Q, STEPS),), ((1.0, 0.01, 500), (2.0, 0.3, 7)), ((0.01, 1e-6, 3),)):
        prvs = [PoissonSubsampledGaussianPRV(q, s) for s, q, _ in history]
        theirs = compute_safe_domain_size(prvs=prvs, max_self_compositions=[n for *_, n in history], eps_error=0.01,
                                          delta_error=DELTA / 1000)
        assert report_check._prv_half_width(history, 0.01, DELTA / 1000) == pytest.approx(theirs, rel=1e-12)


@pytest.mark.parametrize("history", [((SIGMA, Q, STEPS),), ((1.0, 0.01, 500), (2.0, 0.3, 7))])
def test_the_prv_epsilon_is_opacus_own(history):
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = list(history)
    assert report_check.server_epsilon(history, DELTA, "prv") == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)
