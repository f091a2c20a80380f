"""The identities of ALGORITHMS.md, checked numerically: float64, random factors, mixed ranks, several seeds."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.strategies import LoraFactors, get_strategy, merge_into_weight, pruned_rank, tail_norm
from fedlora.strategies.flexlora import dense_svd, factored_svd

SEEDS = [0, 1, 2, 3]
SHAPES = {"attn.q": (12, 10), "attn.v": (9, 14)}  # module -> (d_out, d_in)
ALPHA = 8.0
TOL = 1e-8


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def random_update(rng, ranks: dict[str, int], scale=lambda r: ALPHA / r) -> dict[str, LoraFactors]:
    return {
        m: LoraFactors(A=rng.normal(size=(ranks[m], d_in)), B=rng.normal(size=(d_out, ranks[m])), scale=scale(ranks[m]))
        for m, (d_out, d_in) in SHAPES.items()
    }


def random_round(seed: int, K: int | None = None, mixed: bool = True, rank: int = 4):
    rng = np.random.default_rng(seed)
    K = K or int(rng.integers(3, 7))
    updates = []
    for _ in range(K):
        ranks = {m: int(rng.integers(1, 7)) if mixed else rank for m in SHAPES}
        updates.append(random_update(rng, ranks))
    weights = rng.uniform(0.5, 3.0, size=K)  # like example counts: normalised inside
    return rng, updates, weights


def exact(updates, weights, m: str) -> np.ndarray:
    """ΔW* = Σ p_k s_k B_k A_k, computed densely and independently of the strategies."""
    p = np.asarray(weights) / np.sum(weights)
    return sum(pk * u[m].scale * u[m].B @ u[m].A for pk, u in zip(p, updates))


# 1. FedIT ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_fedit_error_is_weighted_covariance(seed):
    _, updates, w = random_round(seed, mixed=False)
    res = get_strategy("fedit").aggregate(updates, w)
    p = w / w.sum()
    for m in SHAPES:
        A_bar = sum(pk * u[m].A for pk, u in zip(p, updates))
        B_bar = sum(pk * u[m].B for pk, u in zip(p, updates))
        s = updates[0][m].scale
        cov = s * sum(pk * (u[m].B - B_bar) @ (u[m].A - A_bar) for pk, u in zip(p, updates))
        error = exact(updates, w, m) - res.effective_delta(m)
        assert np.linalg.norm(cov) > 1e-3  # the baseline is really inexact here
        assert rel(error, cov) <= TOL
        down = res.downlink(updates[0][m].rank)[m]
        assert rel(down.A, A_bar) <= TOL and rel(down.B, B_bar) <= TOL


def test_fedit_exact_when_all_A_equal():
    rng = np.random.default_rng(7)
    A = rng.normal(size=(3, 10))
    updates = [{"m": LoraFactors(A=A, B=rng.normal(size=(6, 3)), scale=2.0)} for _ in range(4)]
    w = [1, 2, 3, 4]
    res = get_strategy("fedit").aggregate(updates, w)
    assert rel(res.effective_delta("m"), exact(updates, w, "m")) <= TOL


# 2. FFA -----------------------------------------------------------------------------------------------------------
def ffa_round(seed: int, common_scale: bool):
    rng = np.random.default_rng(seed)
    r_max = 6
    A_max = {m: rng.normal(size=(r_max, d_in)) for m, (_, d_in) in SHAPES.items()}
    K = int(rng.integers(3, 7))
    ranks = rng.integers(1, r_max + 1, size=K)
    ranks[0] = r_max  # the widest client holds all of A_max
    scale = (lambda r: 2.0) if common_scale else (lambda r: ALPHA / r)
    updates = [
        {m: LoraFactors(A=A_max[m][:r].copy(), B=rng.normal(size=(d_out, r)), scale=scale(r))
         for m, (d_out, _) in SHAPES.items()}
        for r in ranks
    ]
    return updates, rng.uniform(0.5, 3, size=K), A_max, ranks


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("common_scale", [True, False])
def test_ffa_exact_with_nested_mixed_ranks(seed, common_scale):
    updates, w, A_max, ranks = ffa_round(seed, common_scale)
    res = get_strategy("ffa").aggregate(updates, w)
    p = w / w.sum()
    for m in SHAPES:
        assert rel(res.effective_delta(m), exact(updates, w, m)) <= TOL
        top = res.downlink(int(ranks.max()))[m]
        assert np.array_equal(top.A, A_max[m][: ranks.max()])
        assert rel(top.scale * top.B @ top.A, exact(updates, w, m)) <= TOL
        if common_scale:  # the ALGORITHMS.md statement: Σ p_k pad(B_k) is the global B
            padded = sum(pk * np.hstack([u[m].B, np.zeros((u[m].B.shape[0], 6 - u[m].rank))])
                         for pk, u in zip(p, updates))
            assert rel(top.B, padded) <= TOL
        for r in range(1, 7):  # every prefix is the global's prefix product
            d = res.downlink(r)[m]
            assert np.array_equal(d.A, A_max[m][:r])
            assert rel(d.scale * d.B @ d.A, res.scale[m] * res.B[m][:, :r] @ A_max[m][:r]) <= TOL


@pytest.mark.parametrize("seed", SEEDS)
def test_ffa_refuses_non_identical_A(seed):
    updates, w, _, _ = ffa_round(seed, common_scale=True)
    bad = len(updates) - 1
    A = updates[bad]["attn.v"].A.copy()
    A[0, 0] = np.nextafter(A[0, 0], np.inf)  # one ulp is enough to break exactness
    updates[bad]["attn.v"] = LoraFactors(A=A, B=updates[bad]["attn.v"].B, scale=updates[bad]["attn.v"].scale)
    with pytest.raises(ValueError, match=rf"client {bad}, module 'attn.v'.*bit-identical"):
        get_strategy("ffa").aggregate(updates, w)


def test_ffa_refuses_a_changed_A_in_a_later_round():
    updates, w, _, _ = ffa_round(0, common_scale=True)
    ffa = get_strategy("ffa")
    ffa.aggregate(updates, w)
    rng = np.random.default_rng(99)  # a client re-seeded: a different A
    other = [{m: LoraFactors(A=rng.normal(size=f.A.shape), B=f.B, scale=f.scale) for m, f in u.items()}
             for u in updates[:1]]
    with pytest.raises(ValueError, match="differs from the shared A"):
        ffa.aggregate(other, [1.0])


# 3. FLoRA ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_flora_stacking_exact_with_sampled_ranks(seed):
    rng, population, w_all = random_round(seed, K=8)
    sampled = sorted(rng.choice(8, size=int(rng.integers(2, 6)), replace=False))
    updates, w = [population[i] for i in sampled], w_all[sampled]
    res = get_strategy("flora").aggregate(updates, w)
    assert res.downlink(4) == {}
    for m, (d_out, d_in) in SHAPES.items():
        B_st, A_st = res.base_delta_factors[m]
        R = sum(u[m].rank for u in updates)
        assert B_st.shape == (d_out, R) and A_st.shape == (R, d_in)
        assert res.stacked_rank(m) == R < sum(u[m].rank for u in population) or len(sampled) == 8
        assert rel(B_st @ A_st, exact(updates, w, m)) <= TOL
        assert rel(res.base_delta[m], exact(updates, w, m)) <= TOL
        assert rel(res.effective_delta(m), exact(updates, w, m)) <= TOL
    assert res.downlink_nbytes(2) == res.downlink_nbytes(6) == 4 * sum(
        (d_out + d_in) * sum(u[m].rank for u in updates) for m, (d_out, d_in) in SHAPES.items()
    )


# 4. FedEx ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_fedex_residual_makes_global_exact(seed):
    rng, updates, w = random_round(seed, mixed=False, rank=2)
    res = get_strategy("fedex").aggregate(updates, w)
    K, r = len(updates), 2
    for m, (d_out, d_in) in SHAPES.items():
        W0 = rng.normal(size=(d_out, d_in))
        down = res.downlink(r)[m]
        merged = W0 + res.base_delta[m] + down.scale * down.B @ down.A
        assert rel(merged - W0, exact(updates, w, m)) <= TOL
        assert rel(res.effective_delta(m), exact(updates, w, m)) <= TOL
        B_res, A_res = res.base_delta_factors[m]
        assert B_res.shape == (d_out, (K - 1) * r) and A_res.shape == ((K - 1) * r, d_in)
        assert rel(B_res @ A_res, res.base_delta[m]) <= TOL
        assert np.linalg.matrix_rank(res.base_delta[m]) <= (K - 1) * r


def test_fedex_residual_rank_bound_is_tight_enough_to_fail():
    """With K·r < min(d) the dense residual has rank (K−1)·r exactly, one block less than the naive stacking."""
    rng = np.random.default_rng(5)
    updates = [{"m": LoraFactors(A=rng.normal(size=(2, 30)), B=rng.normal(size=(30, 2)), scale=1.0)} for _ in range(4)]
    res = get_strategy("fedex").aggregate(updates, [1, 1, 2, 3])
    assert np.linalg.matrix_rank(res.base_delta["m"]) == 3 * 2


@pytest.mark.parametrize("seed", SEEDS)
def test_merge_into_weight_linear_and_fan_in_fan_out(seed):
    rng = np.random.default_rng(seed)
    delta = rng.normal(size=(5, 7))  # d_out x d_in
    W_linear = rng.normal(size=(5, 7))
    assert np.allclose(merge_into_weight(W_linear, delta, fan_in_fan_out=False), W_linear + delta, rtol=0, atol=0)
    W_conv1d = W_linear.T.copy()  # GPT-2 Conv1D stores d_in x d_out
    merged = merge_into_weight(W_conv1d, delta, fan_in_fan_out=True)
    assert np.array_equal(merged.T, W_linear + delta)
    with pytest.raises(ValueError, match="does not match"):
        merge_into_weight(W_linear, delta, fan_in_fan_out=True)
    square = rng.normal(size=(6, 6))
    D = rng.normal(size=(6, 6))  # a wrong flag on a square weight adds the transpose: the anchor bug
    assert not np.allclose(merge_into_weight(square, D, True), merge_into_weight(square, D, False))


# 5. FlexLoRA ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_flexlora_factored_svd_equals_dense(seed):
    _, updates, w = random_round(seed)
    p = w / w.sum()
    res = get_strategy("flexlora").aggregate(updates, w)
    for m in SHAPES:
        factors = [u[m] for u in updates]
        U, s, V = factored_svd(factors, p)
        Ud, sd, Vd = dense_svd(factors, p)
        k = s.size
        assert k == min(sum(f.rank for f in factors), *SHAPES[m])
        assert np.max(np.abs(s - sd[:k])) <= TOL * sd[0]
        assert np.all(sd[k:] <= TOL * sd[0])
        assert rel(res.effective_delta(m), exact(updates, w, m)) <= TOL
        for r in range(1, k + 1):
            dense_r = (Ud[:, :r] * sd[:r]) @ Vd[:, :r].T
            gap = sd[r - 1] - (sd[r] if r < sd.size else 0.0)
            if gap > 1e-4 * sd[0]:  # the rank-r approximation is unique only with a spectral gap
                assert rel(res.truncated_delta(m, r), dense_r) <= TOL
            err = np.linalg.norm(exact(updates, w, m) - res.truncated_delta(m, r))
            tail = np.sqrt(np.sum(sd[r:] ** 2))
            assert abs(err - tail) <= TOL * sd[0]
            assert abs(res.truncation_error(m, r) - tail) <= TOL * sd[0]


@pytest.mark.parametrize("seed", SEEDS)
def test_flexlora_downlink_is_best_rank_r_approximation(seed):
    _, updates, w = random_round(seed)
    res = get_strategy("flexlora", scale_for_rank=lambda r: ALPHA / r).aggregate(updates, w)
    for r in (1, 3, 6, 9):  # 9 may exceed Σr_k of a module: completed with orthonormal rows, B = 0
        down = res.downlink(r)
        for m, (d_out, d_in) in SHAPES.items():
            f = down[m]
            assert f.A.shape == (r, d_in) and f.B.shape == (d_out, r) and f.scale == ALPHA / r
            assert np.allclose(f.A @ f.A.T, np.eye(r), atol=1e-10)
            assert rel(f.scale * f.B @ f.A, res.truncated_delta(m, r)) <= TOL
            # B = U_r Σ_r / s_r: orthogonal columns whose norms are the leading singular values
            k = min(r, res.singular_values[m].size)
            gram = (f.scale * f.B[:, :k]).T @ (f.scale * f.B[:, :k])
            assert np.allclose(gram, np.diag(res.singular_values[m][:k] ** 2), atol=TOL * gram.max())


@pytest.mark.parametrize("seed", SEEDS)
def test_flexlora_wide_modules_use_the_factored_path(seed):
    """Σr_k well below d: the strategy's SVD (factored route) against the dense one, on its own result."""
    rng = np.random.default_rng(seed)
    ranks = rng.integers(1, 5, size=3)
    ups = [{"w": LoraFactors(A=rng.normal(size=(r, 40)), B=rng.normal(size=(35, r)), scale=ALPHA / r)} for r in ranks]
    w = rng.uniform(1, 3, size=3)
    res = get_strategy("flexlora").aggregate(ups, w)
    _, sd, _ = dense_svd([u["w"] for u in ups], w / w.sum())
    s = res.singular_values["w"]
    assert s.size == ranks.sum() < 35  # the core size, not min(d): the factored route ran
    assert np.max(np.abs(s - sd[: s.size])) <= TOL * sd[0]
    assert rel(res.effective_delta("w"), exact(ups, w, "w")) <= TOL


# 6. Zero-padding vs RBLA ------------------------------------------------------------------------------------------
def shared_slot_round(seed: int):
    """Clients that agree in every shared slot: client k holds the first r_k slots of one adapter (its own ΔW
    per slot, B expressed at its own scale alpha/r_k; the adapter's B is at the widest client's scale)."""
    rng = np.random.default_rng(seed)
    r_max = 6
    true = {m: (rng.normal(size=(r_max, d_in)), rng.normal(size=(d_out, r_max))) for m, (d_out, d_in) in SHAPES.items()}
    K = int(rng.integers(3, 7))
    ranks = rng.integers(1, r_max + 1, size=K)
    ranks[0] = r_max
    ranks[1] = 1  # so that some slots are held by part of the weight only
    updates = [{m: LoraFactors(A=A[:r].copy(), B=B[:, :r] * (ALPHA / r_max) / (ALPHA / r), scale=ALPHA / r)
                for m, (A, B) in true.items()} for r in ranks]
    w = rng.uniform(0.5, 3, size=K)
    p = w / w.sum()
    c = np.array([p[ranks > j].sum() for j in range(r_max)])
    return updates, w, true, c


@pytest.mark.parametrize("seed", SEEDS)
def test_zeropad_dilutes_slots_by_coverage(seed):
    updates, w, true, c = shared_slot_round(seed)
    assert c.min() < 1 - 1e-3
    res = get_strategy("zeropad").aggregate(updates, w)
    down = res.downlink(6)
    for m, (A, B) in true.items():
        assert rel(down[m].A, c[:, None] * A) <= TOL
        assert rel(down[m].B, B * c[None, :]) <= TOL
        for j in range(6):  # the slot's rank-1 product shrinks by c_j²
            slot = np.outer(down[m].B[:, j], down[m].A[j])
            assert rel(slot, c[j] ** 2 * np.outer(B[:, j], A[j])) <= TOL
        assert rel(res.slot_weights[m], c) <= TOL


@pytest.mark.parametrize("seed", SEEDS)
def test_rbla_keeps_slots_undiluted(seed):
    updates, w, true, c = shared_slot_round(seed)
    res = get_strategy("rbla").aggregate(updates, w)
    for r in range(1, 7):
        down = res.downlink(r)
        for m, (A, B) in true.items():  # every client gets its own factors back, at its own scale
            assert down[m].scale == ALPHA / r
            assert rel(down[m].A, A[:r]) <= TOL and rel(down[m].B, B[:, :r] * r / 6) <= TOL
    assert rel(res.slot_weights["attn.q"], c) <= TOL


@pytest.mark.parametrize("seed", SEEDS)
def test_rbla_and_zeropad_match_the_slot_formulas(seed):
    _, updates, w = random_round(seed)
    p = w / w.sum()
    rbla = get_strategy("rbla").aggregate(updates, w)
    zp = get_strategy("zeropad").aggregate(updates, w)
    for m in SHAPES:
        r_max = max(u[m].rank for u in updates)
        s_g = max((u[m] for u in updates), key=lambda f: f.rank).scale  # B averaged at the widest scale
        for j in range(r_max):
            holders = [k for k, u in enumerate(updates) if u[m].rank > j]
            cj = sum(p[k] for k in holders)
            a = sum(p[k] * updates[k][m].A[j] for k in holders)
            b = sum(p[k] * updates[k][m].B[:, j] * updates[k][m].scale / s_g for k in holders)
            assert rel(rbla.A[m][j], a / cj) <= TOL and rel(rbla.B[m][:, j], b / cj) <= TOL
            assert rel(zp.A[m][j], a) <= TOL and rel(zp.B[m][:, j], b) <= TOL


# 7. HetLoRA -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_hetlora_weights_proportional_to_update_norms(seed):
    _, updates, w = random_round(seed)
    res = get_strategy("hetlora").aggregate(updates, w)
    for m in SHAPES:
        q = res.client_weights[m]
        norms = np.array([np.linalg.norm(u[m].scale * u[m].B @ u[m].A) for u in updates])
        assert abs(q.sum() - 1) <= 1e-12
        assert rel(q, norms / norms.sum()) <= TOL
        r_max = max(u[m].rank for u in updates)  # and it is zero-padding under those weights
        A_pad = sum(qk * np.vstack([u[m].A, np.zeros((r_max - u[m].rank, u[m].A.shape[1]))])
                    for qk, u in zip(q, updates))
        assert rel(res.A[m], A_pad) <= TOL


def test_hetlora_weights_ignore_data_sizes_and_use_plain_norms_at_common_scale():
    rng = np.random.default_rng(3)
    updates = [{"m": LoraFactors(A=rng.normal(size=(r, 8)), B=rng.normal(size=(7, r)), scale=1.5)} for r in (2, 5, 3)]
    a = get_strategy("hetlora").aggregate(updates, [1, 1, 1]).client_weights["m"]
    b = get_strategy("hetlora").aggregate(updates, [100, 1, 7]).client_weights["m"]
    norms = np.array([np.linalg.norm(u["m"].B @ u["m"].A) for u in updates])
    assert np.allclose(a, b, rtol=0, atol=1e-15) and rel(a, norms / norms.sum()) <= TOL


@pytest.mark.parametrize("seed", SEEDS)
def test_hetlora_tail_norm_and_pruning_rule(seed):
    rng = np.random.default_rng(seed)
    r, gamma = int(rng.integers(4, 12)), 0.75
    A, B = rng.normal(size=(r, 9)), rng.normal(size=(7, r))
    k = int(np.floor(gamma * r))
    expected = np.linalg.norm(B[:, k:]) * np.linalg.norm(A[k:])
    assert abs(tail_norm(A, B, gamma) - expected) <= TOL * expected
    assert pruned_rank(r, tail_before=2.0, tail_after=1.0, gamma=gamma) == k
    assert pruned_rank(r, tail_before=1.0, tail_after=1.0, gamma=gamma) == r
    assert pruned_rank(r, tail_before=1.0, tail_after=3.0, gamma=gamma) == r
    assert pruned_rank(2, tail_before=2.0, tail_after=1.0, gamma=0.4, min_rank=1) == 1  # ⌊0.8⌋ = 0 -> floor 1
    assert pruned_rank(100, 2.0, 1.0, gamma=0.29) == 29  # 0.29·100 is 28.999… in floating point
    het = get_strategy("hetlora", gamma=0.8, lam=0.05, min_rank=2)
    assert (het.gamma, het.lam, het.client_penalty, het.min_rank) == (0.8, 0.05, 0.05, 2)
    k8 = int(np.floor(0.8 * r))
    assert het.kept_slots(r) == max(min(2, r), k8)
    assert het.pruned_rank(r, 2.0, 1.0) == max(min(2, r), k8) and het.pruned_rank(r, 1.0, 2.0) == r
    assert het.kept_slots(2) == 2 and het.tail_norm(A[:2], B[:, :2]) == 0.0  # at min_rank: nothing to prune
    assert abs(het.tail_norm(A, B) - np.linalg.norm(B[:, het.kept_slots(r):]) * np.linalg.norm(A[het.kept_slots(r):])) \
        <= TOL * expected



def test_hetlora_client_hooks_keep_the_numbers_of_the_default_rule():
    """Pinned: the hooks the trainer calls (defaults γ = 0.9, λ = 1e-3, min_rank = 1) give today's numbers."""
    het = get_strategy("hetlora")
    assert het.client_penalty == 1e-3 and het.clients_change_rank
    ranks = [1, 2, 4, 8, 10, 16, 100]
    assert [het.kept_slots(r) for r in ranks] == [1, 1, 3, 7, 9, 14, 90]
    assert [het.pruned_rank(r, 2.0, 1.0) for r in ranks] == [1, 1, 3, 7, 9, 14, 90]
    assert [het.pruned_rank(r, 1.0, 1.0) for r in ranks] == ranks  # the tail did not shrink: keep the rank
    A, B = np.arange(24.0).reshape(8, 3) / 10, np.arange(32.0).reshape(4, 8) / 10
    # slot 7 is the tail: ‖(0.7, 1.5, 2.3, 3.1)‖ = 4.2, ‖(2.1, 2.2, 2.3)‖ = sqrt(14.54)
    assert het.tail_norm(A, B) == pytest.approx(4.2 * np.sqrt(14.54), rel=1e-14)
    assert het.tail_norm(A[:1], B[:, :1]) == 0.0  # a rank-1 client has no tail
    # the trainer's penalty is client_penalty · Σ ‖B[:, k:]‖·‖A[k:]‖ with k = kept_slots(r): the same tail
    k = het.kept_slots(8)
    assert het.client_penalty * np.linalg.norm(B[:, k:]) * np.linalg.norm(A[k:]) == \
        pytest.approx(1e-3 * het.tail_norm(A, B), rel=1e-14)


# 8. LoRA-FAIR -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("lam", [0.0, 1e-11])
def test_lora_fair_small_lambda_reaches_row_space_projection(seed, lam):
    _, updates, w = random_round(seed, mixed=False, rank=3)
    res = get_strategy("lora-fair", lam=lam).aggregate(updates, w)
    fedit = get_strategy("fedit").aggregate(updates, w)
    for m in SHAPES:
        A_bar = res.A[m]
        target = exact(updates, w, m) @ np.linalg.pinv(A_bar) @ A_bar
        assert rel(res.effective_delta(m), target) <= 1e-8
        # least squares in Ā's row space: never worse than plain averaging
        err_fair = np.linalg.norm(exact(updates, w, m) - res.effective_delta(m))
        err_fedit = np.linalg.norm(exact(updates, w, m) - fedit.effective_delta(m))
        assert err_fair < err_fedit


@pytest.mark.parametrize("seed", SEEDS)
def test_lora_fair_ridge_formula(seed):
    _, updates, w = random_round(seed, mixed=False, rank=3)
    lam = 0.01
    res = get_strategy("lora-fair").aggregate(updates, w)
    assert get_strategy("lora-fair").lam == lam  # documented default
    fedit = get_strategy("fedit").aggregate(updates, w)
    for m in SHAPES:
        A_bar, B_bar, s = fedit.A[m], fedit.B[m], fedit.scale[m]
        dB = (exact(updates, w, m) / s - B_bar @ A_bar) @ A_bar.T @ np.linalg.inv(A_bar @ A_bar.T + lam * np.eye(3))
        assert rel(res.correction[m], dB) <= TOL
        d = res.downlink(3)[m]
        assert rel(d.B, B_bar + dB) <= TOL and rel(d.A, A_bar) <= TOL
