"""The public contract of fedlora.strategies: registry, flags, validation errors, downlink shapes, byte counts,
state across rounds and the small shared helpers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import fedlora.strategies as strategies
from fedlora.strategies import (
    WIRE_BYTES,
    LoraFactors,
    available_strategies,
    get_strategy,
    product_fro_norm,
    weighted_mean,
)

NAMES = ["fedit", "ffa", "rbla", "zeropad", "hetlora", "flora", "flexlora", "fedex", "lora-fair"]
MIXED = ["ffa", "rbla", "zeropad", "hetlora", "flora", "flexlora"]
SAME_RANK_ONLY = ["fedit", "fedex", "lora-fair"]
# Methods whose clients all hold the server's A (random factors per client do not fit them): own test files.
COMMON_A = ["fedsvd", "rolora", "fedsa", "fedsb"]
SHAPES = {"q": (8, 8), "v": (8, 8), "out": (6, 11)}  # d_out x d_in; q, v square
ALPHA = 16.0


def scale(r: int) -> float:
    return ALPHA / r


def make_round(ranks, seed=0, shared_A=True):
    """Client updates with ranks[k] per module; A nested prefixes of one A_max (valid for FFA too)."""
    rng = np.random.default_rng(seed)
    r_max = max(ranks)
    A_max = {m: rng.normal(size=(r_max, d_in)) for m, (_, d_in) in SHAPES.items()}
    ups = []
    for r in ranks:
        ups.append({
            m: LoraFactors(
                A=A_max[m][:r].copy() if shared_A else rng.normal(size=(r, d_in)),
                B=rng.normal(size=(d_out, r)),
                scale=scale(r),
            )
            for m, (d_out, d_in) in SHAPES.items()
        })
    return ups, list(rng.uniform(1, 5, size=len(ranks)))


def replace(update, module, **changes):
    f = update[module]
    out = dict(update)
    out[module] = LoraFactors(A=changes.get("A", f.A), B=changes.get("B", f.B), scale=changes.get("scale", f.scale))
    return out


# Registry and flags --------------------------------------------------------------------------------------------------
def test_registry_names_and_flags():
    assert sorted(available_strategies()) == sorted(NAMES + COMMON_A)
    linear = {n for n in NAMES if get_strategy(n).linear}
    assert linear == {"fedit", "ffa", "zeropad", "rbla"}
    assert {n for n in NAMES if not get_strategy(n).supports_mixed_ranks} == set(SAME_RANK_ONLY)
    assert {n for n in NAMES if get_strategy(n).fresh_lora_each_round} == {"flora"}
    ffa = get_strategy("ffa")
    assert not ffa.trains_A and not ffa.sends_A
    assert all(get_strategy(n).sends_A for n in NAMES if n != "ffa")
    for n in NAMES:
        assert get_strategy(n).name == n


def test_unknown_strategy_and_bad_options_raise_value_error():
    with pytest.raises(ValueError, match="unknown strategy 'fedavg'"):
        get_strategy("fedavg")
    with pytest.raises(ValueError, match="fedit.*bad options"):
        get_strategy("fedit", gamma=0.5)
    with pytest.raises(ValueError, match="gamma"):
        get_strategy("hetlora", gamma=1.5)
    with pytest.raises(ValueError, match="lam"):
        get_strategy("lora-fair", lam=-1.0)


def test_no_torch_in_strategies():
    root = Path(strategies.__file__).parent
    for path in root.glob("*.py"):
        text = path.read_text()
        assert "import torch" not in text and "from torch" not in text, path.name


def test_one_file_per_method():
    root = Path(strategies.__file__).parent
    for n in NAMES:
        assert (root / f"{n.replace('-', '_')}.py").exists()


# Validation -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_non_finite_values_name_client_and_module(name):
    ups, w = make_round([3, 3, 3])
    B = ups[1]["v"].B.copy()
    B[2, 1] = np.nan
    ups[1] = replace(ups[1], "v", B=B)
    with pytest.raises(ValueError, match=r"client 1, module 'v': B has non-finite"):
        get_strategy(name).aggregate(ups, w)
    ups, w = make_round([3, 3, 3])
    A = ups[2]["q"].A.copy()
    A[0, 0] = np.inf
    ups[2] = replace(ups[2], "q", A=A)
    with pytest.raises(ValueError, match=r"client 2, module 'q': A has non-finite"):
        get_strategy(name).aggregate(ups, w)
    ups, w = make_round([3, 3])
    ups[1] = replace(ups[1], "out", scale=float("nan"))
    with pytest.raises(ValueError, match=r"client 1, module 'out': scale"):
        get_strategy(name).aggregate(ups, w)


@pytest.mark.parametrize("name", NAMES)
def test_mismatched_module_sets(name):
    ups, w = make_round([2, 2, 2])
    ups[2] = {m: f for m, f in ups[2].items() if m != "v"}
    with pytest.raises(ValueError, match=r"client 2: module set.*missing \['v'\]"):
        get_strategy(name).aggregate(ups, w)
    ups, w = make_round([2, 2])
    ups[1] = dict(ups[1], extra=ups[1]["q"])
    with pytest.raises(ValueError, match=r"client 1: module set.*unexpected \['extra'\]"):
        get_strategy(name).aggregate(ups, w)


@pytest.mark.parametrize("name", NAMES)
def test_shape_mismatches(name):
    ups, w = make_round([2, 2, 2])
    ups[1] = replace(ups[1], "q", B=np.ones((8, 3)))  # A has 2 rows, B 3 columns
    with pytest.raises(ValueError, match=r"client 1, module 'q'.*ranks disagree"):
        get_strategy(name).aggregate(ups, w)
    ups, w = make_round([2, 2, 2], shared_A=False)
    ups[2] = replace(ups[2], "out", A=np.ones((2, 12)))  # d_in 12 instead of 11
    with pytest.raises(ValueError, match=r"client 2, module 'out'.*differs from client 0"):
        get_strategy(name).aggregate(ups, w)
    ups, w = make_round([2, 2])
    ups[1] = replace(ups[1], "v", A=np.ones(8), B=np.ones((8, 1)))
    with pytest.raises(ValueError, match=r"client 1, module 'v'.*2-D"):
        get_strategy(name).aggregate(ups, w)


@pytest.mark.parametrize("name", SAME_RANK_ONLY)
def test_mixed_ranks_refused(name):
    ups, w = make_round([4, 4, 2])
    with pytest.raises(ValueError, match=rf"client 2, module '(out|q|v)': rank 2 differs.*{name} cannot take mixed"):
        get_strategy(name).aggregate(ups, w)
    ups, w = make_round([4, 4])
    ups[1] = replace(ups[1], "q", scale=1.0)
    with pytest.raises(ValueError, match=r"client 1, module 'q': scale"):
        get_strategy(name).aggregate(ups, w)


@pytest.mark.parametrize("name", MIXED)
def test_mixed_ranks_accepted(name):
    ups, w = make_round([1, 4, 2, 3])
    get_strategy(name).aggregate(ups, w)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "weights, pattern",
    [([1.0], r"got 1 weights for 2 clients"), ([1.0, -1.0], r"client 1: weight -1"),
     ([0.0, 0.0], r"all client weights are zero"), ([1.0, float("nan")], r"client 1: weight nan")],
)
def test_bad_weights(name, weights, pattern):
    ups, _ = make_round([2, 2])
    with pytest.raises(ValueError, match=pattern):
        get_strategy(name).aggregate(ups, weights)


@pytest.mark.parametrize("name", NAMES)
def test_empty_updates(name):
    with pytest.raises(ValueError, match="no client updates"):
        get_strategy(name).aggregate([], [])


@pytest.mark.parametrize("name", NAMES)
def test_weights_are_normalised_inside(name):
    ups, w = make_round([3, 3, 3])
    a = get_strategy(name).aggregate(ups, w)
    b = get_strategy(name).aggregate(ups, [7.5 * x for x in w])
    for m in SHAPES:
        assert np.allclose(a.effective_delta(m), b.effective_delta(m), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_float32_inputs_accepted(name):
    ups, w = make_round([3, 3])
    ups32 = [{m: LoraFactors(f.A.astype(np.float32), f.B.astype(np.float32), f.scale) for m, f in u.items()}
             for u in ups]
    res = get_strategy(name).aggregate(ups32, w)
    assert res.effective_delta("q").dtype == np.float64


# Downlink shapes per rank ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MIXED)
def test_downlink_shapes_mixed(name):
    ups, w = make_round([2, 5, 3])
    res = get_strategy(name, scale_for_rank=scale).aggregate(ups, w)
    for r in range(1, 6):
        down = res.downlink(r)
        if name == "flora":
            assert down == {}
            continue
        assert set(down) == set(SHAPES)
        for m, (d_out, d_in) in SHAPES.items():
            assert down[m].A.shape == (r, d_in) and down[m].B.shape == (d_out, r)
            assert math.isclose(down[m].scale, scale(r))
            assert np.isfinite(down[m].A).all() and np.isfinite(down[m].B).all()
        assert get_strategy(name).uplink_nbytes(ups[0]) > 0


@pytest.mark.parametrize("name", SAME_RANK_ONLY)
def test_downlink_shapes_same_rank(name):
    ups, w = make_round([4, 4, 4])
    res = get_strategy(name).aggregate(ups, w)
    for m, (d_out, d_in) in SHAPES.items():
        f = res.downlink(4)[m]
        assert f.A.shape == (4, d_in) and f.B.shape == (d_out, 4) and f.scale == scale(4)
    with pytest.raises(ValueError, match="cannot serve rank 3"):
        res.downlink(3)


@pytest.mark.parametrize("name", ["rbla", "zeropad", "hetlora", "flexlora"])
def test_downlink_above_round_rank_stays_trainable(name):
    """A rank larger than any sampled client's: slots exist, A rows are non-zero (else both grads vanish)."""
    ups, w = make_round([2, 1])
    res = get_strategy(name, scale_for_rank=scale).aggregate(ups, w)
    for m, f in res.downlink(6).items():
        assert f.A.shape[0] == 6 and np.all(np.linalg.norm(f.A, axis=1) > 0)
        # the extra slots change nothing: B columns are 0 there (fresh) or carried from earlier rounds
        assert np.allclose(f.B[:, 2:], 0)


def test_downlink_scale_needs_scale_for_rank_when_ambiguous():
    ups, w = make_round([4, 4])
    res = get_strategy("rbla").aggregate(ups, w)
    with pytest.raises(ValueError, match="no scale known for rank 2.*scale_for_rank"):
        res.downlink(2)
    assert get_strategy("rbla", scale_for_rank=scale).aggregate(ups, w).downlink(2)["q"].scale == scale(2)
    ups, w = make_round([4, 2])  # two ranks seen: alpha/r is the only law that fits, so rank 3 is inferred
    assert math.isclose(get_strategy("rbla").aggregate(ups, w).downlink(3)["q"].scale, ALPHA / 3)


def test_ffa_rank_above_shared_A_refused():
    ups, w = make_round([2, 3])
    res = get_strategy("ffa", scale_for_rank=scale).aggregate(ups, w)
    with pytest.raises(ValueError, match="exceeds the shared A"):
        res.downlink(4)


# State across rounds --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["rbla", "zeropad", "hetlora"])
def test_slots_nobody_held_keep_previous_global(name):
    strat = get_strategy(name, scale_for_rank=scale)
    ups1, w1 = make_round([2, 6], seed=1)
    first = strat.aggregate(ups1, w1).downlink(6)
    ups2, w2 = make_round([2, 3], seed=2)
    res2 = strat.aggregate(ups2, w2)
    second = res2.downlink(6)
    for m in SHAPES:
        assert np.array_equal(second[m].A[3:], first[m].A[3:]) and np.array_equal(second[m].B[:, 3:], first[m].B[:, 3:])
        assert np.array_equal(second[m].A[:3], res2.A[m])
    # the memory survives a checkpoint: a fresh strategy loaded with the state serves the same slots
    clone = get_strategy(name, scale_for_rank=scale)
    clone.load_state_dict(strat.state_dict())
    ups3, w3 = make_round([1, 2], seed=3)
    a, b = strat.aggregate(ups3, w3).downlink(6), clone.aggregate(ups3, w3).downlink(6)
    for m in SHAPES:
        assert np.array_equal(a[m].A, b[m].A) and np.array_equal(a[m].B, b[m].B)


def test_zero_weight_client_does_not_kill_its_slots():
    ups, _ = make_round([2, 5])
    res = get_strategy("rbla").aggregate(ups, [1.0, 0.0])
    assert np.all(res.slot_weights["q"][2:] == 0)
    assert np.all(np.linalg.norm(res.A["q"], axis=1) > 0)


def test_ffa_state_roundtrip_keeps_checking_A():
    ups, w = make_round([2, 4])
    ffa = get_strategy("ffa")
    ffa.aggregate(ups, w)
    clone = get_strategy("ffa", scale_for_rank=scale)
    clone.load_state_dict(ffa.state_dict())
    assert clone.aggregate(ups[:1], [1.0]).downlink(4)["q"].A.shape == (4, 8)  # rows 2..3 from the shared A
    other, _ = make_round([2], seed=9)
    with pytest.raises(ValueError, match="differs from the shared A"):
        clone.aggregate(other, [1.0])


# Byte counts ---------------------------------------------------------------------------------------------------------
def test_uplink_bytes_ffa_is_half_of_fedit_for_square_modules():
    ups, _ = make_round([4])
    square = {m: f for m, f in ups[0].items() if SHAPES[m][0] == SHAPES[m][1]}
    fedit, ffa = get_strategy("fedit"), get_strategy("ffa")
    assert ffa.uplink_nbytes(square) * 2 == fedit.uplink_nbytes(square)
    assert fedit.uplink_nbytes(square) == WIRE_BYTES * sum((8 + 8) * 4 for _ in square)
    full = ups[0]
    assert ffa.uplink_nbytes(full) == WIRE_BYTES * 4 * sum(d_out for d_out, _ in SHAPES.values())
    for n in NAMES:
        if n != "ffa":
            assert get_strategy(n).uplink_nbytes(full) == fedit.uplink_nbytes(full)


@pytest.mark.parametrize("name", NAMES)
def test_downlink_bytes(name):
    K, r = 3, 4
    ups, w = make_round([r] * K)
    res = get_strategy(name).aggregate(ups, w)
    per_rank_AB = sum(d_out + d_in for d_out, d_in in SHAPES.values()) * r * WIRE_BYTES
    per_rank_B = sum(d_out for d_out, _ in SHAPES.values()) * r * WIRE_BYTES
    expected = {
        "fedit": per_rank_AB, "lora-fair": per_rank_AB, "rbla": per_rank_AB, "zeropad": per_rank_AB,
        "hetlora": per_rank_AB, "flexlora": per_rank_AB, "ffa": per_rank_B,
        "flora": K * per_rank_AB,  # the stacked factors, Σ r_k wide
        "fedex": per_rank_AB + (K - 1) * per_rank_AB,  # averages plus the (K−1)·r residual factors
    }[name]
    assert res.downlink_nbytes(r) == expected
    if name not in ("flora", "fedex"):
        sent = res.downlink(r)
        counted = sum(f.B.size + (f.A.size if name != "ffa" else 0) for f in sent.values()) * WIRE_BYTES
        assert counted == expected


# Shared helpers -------------------------------------------------------------------------------------------------------
def test_weighted_mean():
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(3, 2)) for _ in range(4)]
    w = [1.0, 2.0, 3.0, 4.0]
    assert np.allclose(weighted_mean(xs, w), sum(wi * x for wi, x in zip(w, xs)) / 10.0, rtol=1e-14)
    with pytest.raises(ValueError, match="client 2: shape"):
        weighted_mean([xs[0], xs[1], np.zeros(3)], [1, 1, 1])
    with pytest.raises(ValueError, match="client 1: non-finite"):
        weighted_mean([xs[0], np.full((3, 2), np.nan)], [1, 1])
    with pytest.raises(ValueError, match="all client weights are zero"):
        weighted_mean(xs[:2], [0, 0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_product_fro_norm_from_grams(seed):
    rng = np.random.default_rng(seed)
    r = int(rng.integers(1, 6))
    A, B = rng.normal(size=(r, 13)), rng.normal(size=(9, r))
    assert math.isclose(product_fro_norm(B, A), np.linalg.norm(B @ A), rel_tol=1e-10)


# First round: every B is still 0 ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_all_zero_B_is_handled(name):
    ups, w = make_round([3, 3, 3])
    ups = [{m: LoraFactors(A=f.A, B=np.zeros_like(f.B), scale=f.scale) for m, f in u.items()} for u in ups]
    res = get_strategy(name).aggregate(ups, w)
    for m in SHAPES:
        assert np.allclose(res.effective_delta(m), 0)
    down = res.downlink(3)
    for f in down.values():  # FLoRA sends nothing; the others: B zero, A still usable rows
        assert np.allclose(f.B, 0) and np.all(np.linalg.norm(f.A, axis=1) > 0)
    if name == "hetlora":  # no norms to weigh by: the data weights are used
        assert np.allclose(res.client_weights["q"], np.asarray(w) / np.sum(w))


def test_fedex_single_client_has_no_residual():
    ups, w = make_round([2])
    res = get_strategy("fedex").aggregate(ups, w)
    B_res, A_res = res.base_delta_factors["q"]
    assert B_res.shape == (8, 0) and A_res.shape == (0, 8) and np.all(res.base_delta["q"] == 0)
    assert res.downlink_nbytes(2) == get_strategy("fedit").aggregate(ups, w).downlink_nbytes(2)


# The seeded init handed to the strategy ---------------------------------------------------------------------------
def initial(seed=11, r_max=6):
    rng = np.random.default_rng(seed)
    return {m: LoraFactors(A=rng.normal(size=(r_max, d_in)), B=np.zeros((d_out, r_max)), scale=scale(r_max))
            for m, (d_out, d_in) in SHAPES.items()}


def test_ffa_initial_factors_give_the_shared_A():
    init = initial()
    rng = np.random.default_rng(0)
    ups = [{m: LoraFactors(A=f.A[:r].copy(), B=rng.normal(size=(f.B.shape[0], r)), scale=scale(r))
            for m, f in init.items()} for r in (2, 3)]
    ffa = get_strategy("ffa", scale_for_rank=scale, initial_factors=init)
    down = ffa.aggregate(ups, [1, 1]).downlink(6)  # no rank-6 client this round: A still known
    for m, f in init.items():
        assert np.array_equal(down[m].A, f.A) and np.all(down[m].B[:, 3:] == 0)
    other = [{m: LoraFactors(A=rng.normal(size=(2, f.A.shape[1])), B=f.B[:, :2], scale=scale(2))
              for m, f in init.items()}]
    with pytest.raises(ValueError, match="differs from the shared A"):
        get_strategy("ffa", initial_factors=init).aggregate(other, [1.0])


@pytest.mark.parametrize("name", ["rbla", "zeropad", "hetlora"])
def test_initial_factors_fill_slots_nobody_held_yet(name):
    init = initial()
    ups, w = make_round([2, 3])
    down = get_strategy(name, scale_for_rank=scale, initial_factors=init).aggregate(ups, w).downlink(6)
    for m, f in init.items():
        assert np.array_equal(down[m].A[3:], f.A[3:]) and np.array_equal(down[m].B[:, 3:], f.B[:, 3:])


def test_initial_factors_are_validated():
    bad = initial()
    bad["q"] = LoraFactors(A=np.full((6, 8), np.nan), B=np.zeros((8, 6)), scale=1.0)
    with pytest.raises(ValueError, match=r"ffa: initial_factors, module 'q': A has non-finite"):
        get_strategy("ffa", initial_factors=bad)
    for name in NAMES:  # every method accepts the same construction call from the server
        get_strategy(name, scale_for_rank=scale, seed=3, initial_factors=initial())


def test_the_contract_is_explicit_abstract_aggregate_and_no_op_client_hooks():
    from fedlora.strategies import Strategy

    with pytest.raises(TypeError, match="abstract"):
        Strategy()  # aggregate must be implemented

    class Minimal(Strategy):
        def aggregate(self, updates, weights):
            raise NotImplementedError

    m = Minimal()
    assert m.client_penalty == 0.0 and m.kept_slots(8) == 8 and m.pruned_rank(8, 1.0, 0.5) == 8
    assert m.tail_norm(np.ones((8, 3)), np.ones((4, 8))) == 0.0
    assert m.contribution_scales([4, 8], [2.0, 1.0]) == [1.0, 1.0]
    assert not m.clients_change_rank and not m.per_slot_mean
    assert not m.exact and not m.linear and not m.merges_into_base and m.supports_mixed_ranks
    assert m.state_dict() == {} and m.load_state_dict({}) is None
    # HetLoRA overrides exactly these hooks with its rule.
    het = get_strategy("hetlora", gamma=0.5, lam=0.01)
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(8, 5)), rng.normal(size=(6, 8))
    assert het.client_penalty == 0.01 and het.kept_slots(8) == 4 and het.clients_change_rank
    assert het.tail_norm(A, B) == pytest.approx(np.linalg.norm(B[:, 4:]) * np.linalg.norm(A[4:]))
    assert het.pruned_rank(8, 2.0, 1.0) == 4 and het.pruned_rank(8, 1.0, 2.0) == 8
    # FFA's contribution to its B̄ is s_k / s_g (alpha/r: a rank-4 client weighs 2x among rank-8 ones).
    assert get_strategy("ffa").contribution_scales([4, 8], [2.0, 1.0]) == [2.0, 1.0]


# The explicit contract: registry, typed options, flags ---------------------------------------------------------------
@pytest.fixture
def scratch_registry():
    """Methods registered in the test are forgotten afterwards (the registry is process-wide)."""
    before = set(available_strategies())
    yield
    for name in set(available_strategies()) - before:
        strategies.unregister(name)
    assert set(available_strategies()) == before


def test_unregister_forgets_a_method(scratch_registry):
    from fedlora.strategies import Strategy, register

    @register("short-lived")
    class ShortLived(Strategy):
        def aggregate(self, updates, weights):
            raise NotImplementedError

    assert isinstance(get_strategy("short-lived"), ShortLived)
    strategies.unregister("short-lived")
    assert "short-lived" not in available_strategies()
    with pytest.raises(ValueError, match="unknown strategy 'short-lived'"):
        strategies.unregister("short-lived")
    register("short-lived")(ShortLived)  # the name and the class are free again


def test_registering_a_name_twice_is_refused(scratch_registry):
    from fedlora.strategies import Strategy, register

    class Again(Strategy):
        def aggregate(self, updates, weights):
            raise NotImplementedError

    with pytest.raises(ValueError, match=r"^strategy name 'rbla' is already registered by RBLA$"):
        register("rbla")(Again)
    assert strategies.strategy_class("rbla").__name__ == "RBLA" and Again.name == ""
    register("again")(Again)
    with pytest.raises(ValueError, match="Again is already registered as 'again'"):
        register("again-2")(Again)  # one class, one name (the class's `name` would otherwise change)


def test_register_refuses_what_get_strategy_could_not_build(scratch_registry):
    from pydantic import BaseModel

    from fedlora.strategies import Options, Strategy, register

    class NoAggregate(Strategy):
        pass

    class Fine(Strategy):
        def aggregate(self, updates, weights):
            raise NotImplementedError

    class Loose(BaseModel):  # unknown options would be dropped silently
        mu: float = 1.0

    class Mu(Options):
        mu: float = 1.0

    class Seeded(Options):
        seed: int = 0

    cases = [
        (lambda: register("x")(object), "not a Strategy subclass"),
        (lambda: register("x")(NoAggregate), "does not implement aggregate"),
        (lambda: register("x", options=dict)(Fine), "pydantic model"),
        (lambda: register("x", options=Loose)(Fine), "must forbid unknown fields"),
        (lambda: register("x", options=Seeded)(Fine), r"\['seed'\] are passed by fedlora itself"),
        (lambda: register("x", options=Mu)(Fine), r"Fine.__init__ does not accept \['mu'\]"),
        (lambda: register(" x")(Fine), "non-empty string"),
    ]
    for call, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            call()
    assert "x" not in available_strategies()


def test_unknown_option_is_one_line_listing_the_accepted_ones():
    with pytest.raises(ValueError) as err:
        get_strategy("hetlora", gama=0.5)
    assert str(err.value) == ("strategy 'hetlora': bad options: gama: unknown option "
                              "(accepted options: gamma, lam, min_rank)")
    with pytest.raises(ValueError) as err:
        get_strategy("zeropad", lam=0.1)
    assert str(err.value) == "strategy 'zeropad': bad options: lam: unknown option (accepted options: none)"
    with pytest.raises(ValueError) as err:
        get_strategy("rbla", lam=0.1)
    assert str(err.value) == "strategy 'rbla': bad options: lam: unknown option (accepted options: gamma)"


@pytest.mark.parametrize(
    "name, options, fragment",
    [
        ("hetlora", {"gamma": "x"}, "gamma: Input should be a valid number, got 'x'"),
        ("hetlora", {"gamma": "0.5"}, "gamma: Input should be a valid number"),  # strict: no string coercion
        ("hetlora", {"min_rank": 1.5}, "min_rank: Input should be a valid integer"),
        ("hetlora", {"lam": True}, "lam: Input should be a valid number"),
        ("hetlora", {"gamma": 0.0}, "gamma: Input should be greater than 0"),
        ("hetlora", {"min_rank": 0}, "min_rank: Input should be greater than or equal to 1"),
        ("lora-fair", {"lam": float("nan")}, "lam: Input should be a finite number"),
        ("lora-fair", {"lam": [0.1]}, "lam: Input should be a valid number"),
    ],
)
def test_wrongly_typed_or_out_of_range_options_are_one_line(name, options, fragment):
    with pytest.raises(ValueError) as err:
        get_strategy(name, **options)
    msg = str(err.value)
    assert msg.startswith(f"strategy {name!r}: bad options: ") and fragment in msg and "\n" not in msg


def test_options_reach_the_method_and_defaults_match_its_constructor():
    import inspect

    het = get_strategy("hetlora", gamma=1, lam=0.02, min_rank=3)  # an int is a valid float
    assert (het.gamma, het.lam, het.min_rank) == (1.0, 0.02, 3) and isinstance(het.gamma, float)
    for name in NAMES:
        cls, model = strategies.strategy_class(name), strategies.strategy_options(name)
        params = inspect.signature(cls.__init__).parameters
        for field, info in model.model_fields.items():
            assert params[field].default == info.default, (name, field)
        assert set(model.model_fields) == set(params) - {"self", *strategies.INTERNAL_OPTIONS}, name
    assert set(strategies.strategy_options("hetlora").model_fields) == {"gamma", "lam", "min_rank"}
    assert set(strategies.strategy_options("lora-fair").model_fields) == {"lam"}


def test_internal_keyword_arguments_are_not_user_options():
    s = get_strategy("hetlora", gamma=0.5, scale_for_rank=scale, seed=7, initial_factors=initial())
    assert s.seed == 7 and s.scale_for_rank is scale and set(s.initial_factors) == set(SHAPES)


def test_a_method_defined_outside_the_package_registers_and_aggregates(scratch_registry):
    from pydantic import Field

    from fedlora.strategies import AggregationResult, Options, Strategy, register

    class ShrinkOptions(Options):
        shrink: float = Field(0.5, gt=0.0, le=1.0)

    class ShrinkResult(AggregationResult):
        def __init__(self, deltas):
            super().__init__()
            self.deltas = deltas

        def effective_delta(self, module):
            return self.deltas[module]

        def downlink(self, rank):
            return {}

        def downlink_nbytes(self, rank):
            return 0

    @register("shrunk-exact", options=ShrinkOptions)
    class ShrunkExact(Strategy):
        """shrink · Σ p_k s_k B_k A_k (a toy: exact up to a constant)."""

        def __init__(self, shrink=0.5, scale_for_rank=None, seed=0, initial_factors=None):
            super().__init__(scale_for_rank=scale_for_rank, seed=seed, initial_factors=initial_factors)
            self.shrink = shrink

        def aggregate(self, updates, weights):
            ups, p, modules = strategies.validate_updates(updates, weights, self.name)
            return ShrinkResult({m: self.shrink * sum(pk * u[m].delta() for pk, u in zip(p, ups)) for m in modules})

    assert "shrunk-exact" in available_strategies() and ShrunkExact.name == "shrunk-exact"
    s = get_strategy("shrunk-exact", shrink=0.25, scale_for_rank=scale, seed=1)
    assert isinstance(s, ShrunkExact) and s.shrink == 0.25 and not s.exact and s.client_penalty == 0.0
    ups, w = make_round([2, 4, 4])
    p = np.asarray(w) / np.sum(w)
    res = s.aggregate(ups, w)
    for m in SHAPES:
        want = 0.25 * sum(pk * u[m].delta() for pk, u in zip(p, ups))
        assert np.allclose(res.effective_delta(m), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="strategy 'shrunk-exact': bad options: shrink"):
        get_strategy("shrunk-exact", shrink=2.0)
    with pytest.raises(ValueError, match=r"client 0: weight -1"):
        s.aggregate(ups, [-1.0, 1.0, 1.0])  # the shared validation comes with the package's helpers
    bad_init = r"Bad.__init__ does not accept \['scale_for_rank', 'seed', 'initial_factors'\]"
    with pytest.raises(ValueError, match=bad_init):
        register("bad")(type("Bad", (ShrunkExact,), {"__init__": lambda self: None}))


def exact_aggregate(ups, w, m):
    p = np.asarray(w) / np.sum(w)
    return sum(pk * u[m].scale * (u[m].B @ u[m].A) for pk, u in zip(p, ups))


@pytest.mark.parametrize("name", NAMES)
def test_exact_flag_says_whether_the_global_change_is_the_exact_aggregate(name):
    ranks = [2, 4, 6] if name in MIXED else [4, 4, 4]
    # FFA needs one shared A (it refuses anything else); the others get independent A_k, where factor averaging
    # is visibly inexact.
    ups, w = make_round(ranks, seed=3, shared_A=(name == "ffa"))
    res = get_strategy(name, scale_for_rank=scale).aggregate(ups, w)
    errs = []
    for m in SHAPES:
        want = exact_aggregate(ups, w, m)
        errs.append(np.linalg.norm(res.effective_delta(m) - want) / np.linalg.norm(want))
    if get_strategy(name).exact:
        assert max(errs) < 1e-10, (name, errs)
    else:
        assert max(errs) > 1e-3, (name, errs)
    assert {n for n in NAMES if strategies.strategy_class(n).exact} == {"ffa", "flora", "flexlora", "fedex"}


@pytest.mark.parametrize("name", NAMES)
def test_merges_into_base_flag_matches_the_results_base_delta(name):
    ranks = [2, 4, 6] if name in MIXED else [4, 4, 4]
    ups, w = make_round(ranks, seed=5, shared_A=(name == "ffa"))
    res = get_strategy(name, scale_for_rank=scale).aggregate(ups, w)
    assert strategies.strategy_class(name).merges_into_base == bool(res.base_delta), name


def test_outside_options_validate_in_the_config(scratch_registry):
    from fedlora.config import ConfigError, load_config
    from fedlora.strategies import Options, Strategy, register

    class MuOptions(Options):
        mu: float = 0.5

    @register("mu-method", options=MuOptions)
    class MuMethod(Strategy):
        def __init__(self, mu=0.5, scale_for_rank=None, seed=0, initial_factors=None):
            super().__init__(scale_for_rank=scale_for_rank, seed=seed, initial_factors=initial_factors)

        def aggregate(self, updates, weights):
            raise NotImplementedError

    cfg = load_config(None, ["strategy.name=mu-method", "strategy.options={mu=0.25}"])
    assert cfg.strategy.options == {"mu": 0.25}
    with pytest.raises(ConfigError) as err:
        load_config(None, ["strategy.name=mu-method", 'strategy.options={mu="x"}'])
    assert str(err.value).startswith("invalid config: strategy.options: strategy 'mu-method': bad options: mu:")
