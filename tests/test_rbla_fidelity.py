"""Issue 18: RBLA's slot shrinkage (gamma), one aggregation scale for mixed ranks, and the lora.scaling rules.

float64, random mixed-rank factors, several seeds. The reference rules are written out here independently of
fedlora.strategies.common (today's RBLA as it was before gamma: slot sums over the holders divided by c_j).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from fedlora.config import ConfigError, LoraConfigSection, load_config
from fedlora.strategies import LoraFactors, get_strategy

SEEDS = [0, 1, 2, 3, 4]
SHAPES = {"attn.q": (12, 10), "attn.v": (9, 14)}  # module -> (d_out, d_in)
ALPHA = 8.0
TOL = 1e-10
RULES = {"alpha/r": lambda r: ALPHA / r, "rslora": lambda r: ALPHA / math.sqrt(r), "constant": lambda r: ALPHA}


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def mixed_round(seed: int, scale=RULES["constant"]):
    """K clients of random ranks 1..6 per module (the widest rank held by client 0), random factors and weights."""
    rng = np.random.default_rng(seed)
    K = int(rng.integers(3, 7))
    ranks = [{m: int(rng.integers(1, 7)) for m in SHAPES} for _ in range(K)]
    for m in SHAPES:
        ranks[0][m] = 6
    ups = [{m: LoraFactors(A=rng.normal(size=(r[m], SHAPES[m][1])), B=rng.normal(size=(SHAPES[m][0], r[m])),
                           scale=scale(r[m])) for m in SHAPES} for r in ranks]
    return ups, rng.uniform(0.5, 3.0, size=K)


def todays_rbla(ups, w, m):
    """RBLA as fedlora computed it before issue 18, written out: slot j of A and of B is the p-weighted mean over
    the clients holding it (raw factors, no scale folding), in the same order of operations."""
    p = np.asarray(w, float) / np.sum(w)
    width = max(u[m].rank for u in ups)
    A = sum(pk * np.vstack([u[m].A, np.zeros((width - u[m].rank, u[m].A.shape[1]))]) for pk, u in zip(p, ups))
    B = sum(pk * np.hstack([u[m].B, np.zeros((u[m].B.shape[0], width - u[m].rank))]) for pk, u in zip(p, ups))
    c = np.array([p[np.array([u[m].rank for u in ups]) > j].sum() for j in range(width)])
    A[c > 0] /= c[c > 0, None]
    B[:, c > 0] /= c[c > 0]
    return A, B, c


# -- gamma ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_gamma_zero_is_todays_rbla_bit_for_bit(seed):
    """Under one scale for every rank (the constant rule) today's rule and RBLA with gamma = 0 agree exactly, in
    the aggregate and in every downlink; gamma = 0 and no option are the same object of computation."""
    ups, w = mixed_round(seed)
    plain, g0 = get_strategy("rbla").aggregate(ups, w), get_strategy("rbla", gamma=0.0).aggregate(ups, w)
    for m in SHAPES:
        A, B, c = todays_rbla(ups, w, m)
        for res in (plain, g0):
            assert np.array_equal(res.A[m], A) and np.array_equal(res.B[m], B)
            assert np.array_equal(res.slot_weights[m], c)
    for r in range(1, 7):
        d0, d1 = plain.downlink(r), g0.downlink(r)
        for m in SHAPES:
            assert np.array_equal(d0[m].A, plain.A[m][:r]) and np.array_equal(d0[m].B, plain.B[m][:, :r])
            assert np.array_equal(d0[m].A, d1[m].A) and np.array_equal(d0[m].B, d1[m].B)


def test_gamma_zero_equals_no_option_over_rounds_with_memory():
    """Three rounds, the widest client missing from the second (slots come from memory): identical states."""
    a, b = get_strategy("rbla"), get_strategy("rbla", gamma=0.0)
    for rnd in range(3):
        ups, w = mixed_round(10 + rnd, RULES["alpha/r"])
        if rnd == 1:
            ups, w = ups[1:], w[1:]
        ra, rb = a.aggregate(ups, w), b.aggregate(ups, w)
        for m in SHAPES:
            assert np.array_equal(ra.A[m], rb.A[m]) and np.array_equal(ra.B[m], rb.B[m])
            for r in (1, 3, 6):
                assert np.array_equal(ra.downlink(r)[m].B, rb.downlink(r)[m].B)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
def test_gamma_shrinks_B_slots_by_coverage(seed, gamma):
    """gamma = 1 is the c_j-weighted slot rule: B's slot j = Σ_{k holds j} p_k B̃_k[:, j] (the holders' sum, not
    their mean), A's slot j the holders' mean; in general B's slot j = mean · c_j^gamma. B̃_k: B_k at the widest
    client's scale (alpha/r here, so the folding is exercised too)."""
    ups, w = mixed_round(seed, RULES["alpha/r"])
    p = w / w.sum()
    res = get_strategy("rbla", gamma=gamma).aggregate(ups, w)
    for m in SHAPES:
        s_g = ups[0][m].scale  # client 0 is the widest
        for j in range(6):
            holders = [k for k, u in enumerate(ups) if u[m].rank > j]
            cj = p[holders].sum()
            a = sum(p[k] * ups[k][m].A[j] for k in holders) / cj
            b_sum = sum(p[k] * ups[k][m].B[:, j] * ups[k][m].scale / s_g for k in holders)
            assert rel(res.A[m][j], a) <= TOL
            assert rel(res.B[m][:, j], b_sum * cj ** (gamma - 1)) <= TOL
            if gamma == 1.0:
                assert rel(res.B[m][:, j], b_sum) <= TOL
        assert res.slot_weights[m][0] == pytest.approx(1.0)  # every client holds slot 0: never shrunk
        assert res.slot_weights[m].min() < 1 - 1e-3  # and some slot is: the test can fail


def test_gamma_option_validated_and_marks_the_instance_nonlinear():
    assert get_strategy("rbla").linear and get_strategy("rbla", gamma=0.0).linear
    assert not get_strategy("rbla", gamma=0.5).linear  # the shrink depends on who replied: no noise-once-on-sum
    with pytest.raises(ValueError, match="gamma"):
        get_strategy("rbla", gamma=-0.1)
    with pytest.raises(ConfigError, match="gamma"):
        load_config(None, ["strategy.name=rbla", "strategy.options={gamma=\"x\"}"])
    cfg = load_config(None, ["strategy.name=rbla", "strategy.options={gamma=0.5}", "federation.ranks=[2,4]"])
    assert cfg.strategy.options == {"gamma": 0.5}


# -- one aggregation scale -----------------------------------------------------------------------------------------
def reexpress(ups, rule):
    """The same clients (same A_k and ΔW_k = s_k B_k A_k) under another scale rule: B_k · s_k / s'(r_k)."""
    return [{m: LoraFactors(A=f.A, B=f.B * f.scale / RULES[rule](f.rank), scale=RULES[rule](f.rank))
             for m, f in u.items()} for u in ups]


def client_deltas(res, ranks):
    return {r: {m: f.delta() for m, f in res.downlink(r).items()} for r in ranks}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("method, options", [("rbla", {}), ("rbla", {"gamma": 0.5}), ("zeropad", {}),
                                             ("hetlora", {}), ("flexlora", {})])
def test_what_a_client_gets_does_not_depend_on_the_scale_rule(seed, method, options):
    """Clients fixed by (A_k, ΔW_k): the ΔW each rank receives is the same whichever rule splits ΔW into s·B.
    Raw factor averaging across ranks (the rule before issue 18) fails this under alpha/r and rsLoRA."""
    ups, w = mixed_round(seed)
    ranks = range(1, 7)
    want = client_deltas(get_strategy(method, **options).aggregate(ups, w), ranks)
    for rule in ("alpha/r", "rslora"):
        got = client_deltas(get_strategy(method, **options).aggregate(reexpress(ups, rule), w), ranks)
        for r in ranks:
            for m in SHAPES:
                assert rel(got[r][m], want[r][m]) <= TOL, (rule, r, m)
                assert got[r][m] is not None
    # The old raw rule really differs here (so this test can fail): slot 0 averaged as raw B under alpha/r.
    alt = reexpress(ups, "alpha/r")
    m = "attn.q"
    A, B, _ = todays_rbla(alt, w, m)
    raw_delta = RULES["alpha/r"](1) * B[:, :1] @ A[:1]
    if method == "rbla" and not options:
        assert rel(raw_delta, want[1][m]) > 1e-3


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rule", list(RULES))
def test_rbla_hands_every_client_its_own_delta_back_when_clients_agree_on_shared_slots(seed, rule):
    """Client k holds the first r_k slots of one adapter (same A rows, same ΔW per slot, B at its own scale):
    RBLA's mean over holders is then that adapter, so each client's ΔW before and after aggregation is equal.
    Zero-padding shrinks the product's slot j by c_j², RBLA with gamma = 1 by c_j."""
    rng = np.random.default_rng(seed)
    scale = RULES[rule]
    true = {m: (rng.normal(size=(6, d_in)), rng.normal(size=(d_out, 6))) for m, (d_out, d_in) in SHAPES.items()}
    ranks = [6, 1, *rng.integers(1, 7, size=int(rng.integers(1, 5)))]
    ups = [{m: LoraFactors(A=A[:r].copy(), B=B[:, :r] * scale(6) / scale(r), scale=scale(r)) for m, (A, B) in true.items()}
           for r in ranks]
    w = rng.uniform(0.5, 3.0, size=len(ranks))
    before = [{m: f.delta() for m, f in u.items()} for u in ups]
    rbla, zp, g1 = (get_strategy(n, **o).aggregate(ups, w) for n, o in
                    (("rbla", {}), ("zeropad", {}), ("rbla", {"gamma": 1.0})))
    for k, r in enumerate(ranks):
        after = rbla.downlink(r)
        for m in SHAPES:
            assert after[m].scale == scale(r)
            assert rel(after[m].delta(), before[k][m]) <= TOL
    c = rbla.slot_weights["attn.q"]
    assert c.min() < 1 - 1e-3
    for m, (A, B) in true.items():
        s6 = scale(6)
        for j in range(6):
            slot = s6 * np.outer(B[:, j], A[j])
            got_zp = zp.scale[m] * np.outer(zp.B[m][:, j], zp.A[m][j])
            got_g1 = g1.scale[m] * np.outer(g1.B[m][:, j], g1.A[m][j])
            assert rel(got_zp, c[j] ** 2 * slot) <= TOL
            assert rel(got_g1, c[j] * slot) <= TOL


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rule", list(RULES))
def test_one_rank_methods_return_identical_clients_unchanged(seed, rule):
    """Every client sends the same factors at one rank: FedIT, LoRA-FAIR, zero-padding and RBLA return them."""
    rng = np.random.default_rng(seed)
    f = {m: LoraFactors(A=rng.normal(size=(4, d_in)), B=rng.normal(size=(d_out, 4)), scale=RULES[rule](4))
         for m, (d_out, d_in) in SHAPES.items()}
    w = rng.uniform(0.5, 3.0, size=3)
    for method in ("fedit", "lora-fair", "zeropad", "rbla"):
        down = get_strategy(method).aggregate([f, f, f], w).downlink(4)
        for m in SHAPES:
            assert down[m].scale == f[m].scale
            assert rel(down[m].delta(), f[m].delta()) <= 1e-8, method


def test_slot_memory_is_rescaled_when_the_widest_client_is_absent():
    """Round 1 with ranks [6, 2] under alpha/r, round 2 with the rank-2 client only: the slots 3..6 that nobody
    held in round 2 keep their round-1 ΔW (remembered at scale s_6, served at the round's scale s_2)."""
    ups, w = mixed_round(3, RULES["alpha/r"])
    strat = get_strategy("rbla", scale_for_rank=RULES["alpha/r"])
    r1 = strat.aggregate(ups, w)
    narrow = [k for k, u in enumerate(ups) if u["attn.q"].rank < 6][:1] or [1]
    r2 = strat.aggregate([ups[narrow[0]]], [1.0])
    for m in SHAPES:
        lo = ups[narrow[0]][m].rank
        d1, d2 = r1.downlink(6)[m], r2.downlink(6)[m]
        tail1 = d1.scale * d1.B[:, lo:] @ d1.A[lo:]
        tail2 = d2.scale * d2.B[:, lo:] @ d2.A[lo:]
        assert rel(tail2, tail1) <= TOL


# -- lora.scaling --------------------------------------------------------------------------------------------------
def test_scale_rules_and_the_auto_default():
    for rule, s in RULES.items():
        cfg = load_config(None, [f"lora.scaling={rule}", "lora.alpha=8"])
        assert cfg.lora.scaling == rule and all(cfg.lora.scale(r) == pytest.approx(s(r)) for r in (1, 2, 8, 16))
    one = load_config(None, [])
    assert one.lora.scaling == "alpha/r"  # one rank: PEFT's default
    from fedlora.config import SCALING_FOR_MIXED_RANKS

    mixed = load_config(None, ["federation.ranks=[2,4,8,16]", "strategy.name=rbla"])
    assert mixed.lora.scaling == SCALING_FOR_MIXED_RANKS
    assert 'scaling = "' in mixed.to_toml()  # resolved, written out
    assert LoraConfigSection().scale(4) == 2.0  # a bare section reads auto as alpha/r


def test_rslora_is_a_deprecated_alias():
    with pytest.warns(DeprecationWarning, match="lora.scaling"):
        cfg = load_config(None, ["lora.rslora=true"])
    assert cfg.lora.scaling == "rslora" and cfg.lora.rslora and cfg.lora.scale(16) == 2.0
    with pytest.raises(ConfigError, match="contradicts"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_config(None, ["lora.rslora=true", "lora.scaling=constant"])
    # An old run folder's config.toml says rslora = false: it resumes with alpha/r even with mixed ranks.
    old = load_config(None, ["lora.rslora=false", "federation.ranks=[2,8]", "strategy.name=zeropad"])
    assert old.lora.scaling == "alpha/r"


@pytest.mark.parametrize("rule", list(RULES))
def test_peft_adapters_get_the_configured_scale(rule):
    """What PEFT computes for the adapter of each rank equals cfg.lora.scale(rank) (so exported adapters reload
    with the scale the federation trained with)."""
    import torch
    from peft import LoraConfig, get_peft_model

    cfg = load_config(None, [f"lora.scaling={rule}", "lora.alpha=8"])
    for r in (2, 16):
        model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(20, 20)),
                               LoraConfig(r=r, target_modules=["0"], **cfg.lora.peft_scaling(r)))
        layer = model.base_model.model[0]
        assert layer.scaling["default"] == pytest.approx(cfg.lora.scale(r))
