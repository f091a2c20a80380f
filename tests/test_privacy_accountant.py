"""Per-client accountant, sigma calibration, budget checks and parameter validation."""

from __future__ import annotations

import json
import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedlora.privacy.accountant import (
    ClientAccountant,
    calibrate_noise_multiplier,
    validate_privacy_params,
    would_exceed,
)

DELTA = 1e-5
# (noise_multiplier, sample_rate, steps) phases, as a client whose sigma or q changed between rounds.
PHASES = [(1.1, 0.05, 30), (0.9, 0.05, 20), (0.9, 0.08, 10), (1.1, 0.05, 5)]


def _fed_step_by_step(opacus_cls):
    acc = opacus_cls()
    for sigma, q, steps in PHASES:
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc


@pytest.mark.parametrize("kind,opacus_cls", [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_epsilon_matches_independent_opacus_accountant(kind, opacus_cls):
    ours = ClientAccountant(kind)
    for sigma, q, steps in PHASES:
        half = steps // 2  # split every phase in two calls: merged back into one entry
        ours.step(sigma, q, half)
        ours.step(sigma, q, steps - half)
    reference = _fed_step_by_step(opacus_cls)
    assert ours.history == reference.history
    assert ours.total_steps == sum(s for _, _, s in PHASES)
    eps_ref = reference.get_epsilon(delta=DELTA)
    assert math.isfinite(eps_ref) and eps_ref > 0
    assert abs(ours.epsilon(DELTA) - eps_ref) <= 1e-6 * eps_ref


def test_epsilon_grows_with_steps_and_is_zero_when_empty():
    acc = ClientAccountant("rdp")
    assert acc.epsilon(DELTA) == 0.0
    acc.step(1.0, 0.1, 10)
    e10 = acc.epsilon(DELTA)
    acc.step(1.0, 0.1, 10)
    assert acc.epsilon(DELTA) > e10 > 0
    acc.step(0.0, 0.1, 1)
    assert acc.epsilon(DELTA) == math.inf


@pytest.mark.parametrize(
    "kind,q,steps,target",
    [
        ("rdp", 0.01, 1000, 1.0),
        ("rdp", 0.05, 200, 3.0),
        ("rdp", 0.1, 50, 8.0),
        ("prv", 0.01, 1000, 1.0),
        ("prv", 0.02, 300, 0.5),
    ],
)
def test_calibration_is_tight(kind, q, steps, target):
    sigma = calibrate_noise_multiplier(target, DELTA, q, steps, accountant=kind)
    eps = ClientAccountant(kind, [(sigma, q, steps)]).epsilon(DELTA)
    assert 0.97 * target <= eps <= target
    # Independent check with Opacus itself.
    ref = {"rdp": RDPAccountant, "prv": PRVAccountant}[kind]()
    ref.history = [(sigma, q, steps)]
    assert ref.get_epsilon(delta=DELTA) <= target


def test_calibration_refuses_impossible_budget():
    with pytest.raises(ValueError, match="cannot reach"):
        calibrate_noise_multiplier(1e-9, DELTA, 1.0, 10_000)


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_state_dict_json_round_trip(kind):
    acc = ClientAccountant(kind)
    for sigma, q, steps in PHASES[:2]:
        acc.step(sigma, q, steps)
    restored = ClientAccountant.from_state_dict(json.loads(json.dumps(acc.state_dict())))
    assert restored == acc
    assert restored.epsilon(DELTA) == acc.epsilon(DELTA)
    # A resumed accountant keeps composing: same as never having stopped.
    restored.step(1.1, 0.05, 7)
    acc.step(1.1, 0.05, 7)
    assert restored.epsilon(DELTA) == acc.epsilon(DELTA)


def test_from_state_dict_refuses_bad_state():
    with pytest.raises(ValueError):
        ClientAccountant.from_state_dict({"kind": "moments", "history": []})
    with pytest.raises(ValueError):
        ClientAccountant.from_state_dict({"history": []})


def test_budget_check_over_rounds():
    rounds, steps_per_round, q, target = 5, 20, 0.05, 2.0
    sigma = calibrate_noise_multiplier(target, DELTA, q, rounds * steps_per_round)
    acc = ClientAccountant("rdp")
    for _ in range(rounds):
        assert not would_exceed(acc, sigma, q, steps_per_round, DELTA, target)
        acc.step(sigma, q, steps_per_round)
    assert acc.epsilon(DELTA) <= target
    # The sixth round would overspend: the client must sit it out, and the check changes nothing.
    history = list(acc.history)
    assert would_exceed(acc, sigma, q, steps_per_round, DELTA, target)
    assert acc.history == history


@pytest.mark.parametrize(
    "kwargs,word",
    [
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"delta": -1e-5}, "delta"),
        ({"clip": 0.0}, "clip"),
        ({"clip": -2.0}, "clip"),
        ({"noise_multiplier": -0.1}, "noise_multiplier"),
        ({"epsilon": float("nan")}, "epsilon"),
    ],
)
def test_invalid_params_refused_with_one_line(kwargs, word):
    with pytest.raises(ValueError) as err:
        validate_privacy_params(**kwargs)
    assert word in str(err.value) and "\n" not in str(err.value)


def test_valid_params_pass_and_bad_sampling_refused():
    validate_privacy_params(epsilon=3.0, delta=1e-5, clip=1.0, noise_multiplier=0.0)
    with pytest.raises(ValueError, match="sample_rate"):
        ClientAccountant().step(1.0, 0.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        ClientAccountant().step(-1.0, 0.1)
    with pytest.raises(ValueError, match="accountant"):
        ClientAccountant("gdp")
