"""FedSVD (ALGORITHMS-style identities in float64 on random factors, and end to end on the embedded data)."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.engines import execute
from fedlora.strategies import LoraFactors, get_strategy
from fedlora.strategies.fedsvd import svd_refactor

# Flower messages need a sender identity (conftest.server_task_identity).
pytestmark = pytest.mark.usefixtures("server_task_identity")


def round_of(seed: int, k: int = 4, r: int = 6, d_out: int = 20, d_in: int = 15, scale: float = 0.5):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(r, d_in))  # one A for every client: what the server sent
    ups = [{"q": LoraFactors(A=A, B=rng.normal(size=(d_out, r)), scale=scale)} for _ in range(k)]
    return ups, rng.uniform(1, 5, size=k)


@pytest.mark.parametrize("seed", range(5))
def test_new_factors_reproduce_the_exact_aggregate_and_A_is_orthonormal(seed):
    ups, w = round_of(seed)
    p = w / w.sum()
    exact = sum(pk * u["q"].delta() for pk, u in zip(p, ups))
    res = get_strategy("fedsvd").aggregate(ups, w)
    np.testing.assert_allclose(res.effective_delta("q"), exact, rtol=1e-10, atol=1e-12)
    down = res.downlink(6)["q"]
    np.testing.assert_allclose(down.A @ down.A.T, np.eye(6), atol=1e-12)
    np.testing.assert_allclose(down.scale * down.B @ down.A, exact, rtol=1e-10, atol=1e-12)
    # B's columns are orthogonal with non-increasing norms (the singular values of B̄A).
    gram = down.B.T @ down.B
    assert np.allclose(gram, np.diag(np.diag(gram)), atol=1e-9) and np.all(np.diff(np.diag(gram)) <= 1e-9)


def test_refactoring_is_from_factors_and_idempotent():
    rng = np.random.default_rng(7)
    B, A = rng.normal(size=(30, 5)), rng.normal(size=(5, 12))
    B1, A1 = svd_refactor(B, A)
    B2, A2 = svd_refactor(B1, A1)
    np.testing.assert_allclose(B1 @ A1, B @ A, atol=1e-12)
    np.testing.assert_allclose(np.abs(B2), np.abs(B1), atol=1e-10)  # up to the signs of singular vectors


def test_refused_with_one_line_reason():
    ups, w = round_of(0)
    other = [dict(u) for u in ups]
    other[2] = {"q": LoraFactors(A=ups[2]["q"].A + 1e-3, B=ups[2]["q"].B, scale=0.5)}
    with pytest.raises(ValueError, match="client 2.*A differs"):
        get_strategy("fedsvd").aggregate(other, w)
    mixed = [ups[0], {"q": LoraFactors(A=ups[1]["q"].A[:3], B=ups[1]["q"].B[:, :3], scale=0.5)}]
    with pytest.raises(ValueError, match="cannot take mixed ranks"):
        get_strategy("fedsvd").aggregate(mixed, [1, 1])
    s = get_strategy("fedsvd")
    assert (s.exact, s.linear, s.supports_mixed_ranks, s.trains_A, s.sends_A, s.downlink_A()) == \
        (True, True, False, False, False, True)


@pytest.mark.slow
def test_fedsvd_learns_end_to_end_and_sends_B_up_A_and_B_down(tmp_path, one_torch_thread):
    import fedlora

    result = fedlora.run(None, overrides=[
        "strategy.name=fedsvd", "federation.num_clients=3", "federation.rounds=3", "federation.local_steps=8",
        "federation.partition=iid", "data.max_eval_examples=300", "data.max_length=48", "output.progress=false",
        "output.save_adapter=false"], out=tmp_path / "fedsvd")
    s = result.summary
    assert s["final_accuracy"] > s["majority_accuracy"] + 0.05, s
    up_lora = result.metrics[0]["bytes_up"] - result.metrics[0]["bytes_up_head"]
    assert up_lora == 3 * 12 * 384 * 8 * 4  # 3 clients x 12 modules x B (384 x 8): A never goes up
    # Round 2's downlink carries the re-factored A as well: 2 x (B + A) per module, plus the head.
    head = result.metrics[0]["bytes_up_head"] // 3
    assert result.metrics[1]["bytes_down"] == 3 * (12 * (384 * 8 + 8 * 384) * 4 + head)


@pytest.mark.slow
def test_the_refactored_A_travels_down_over_flower_as_in_process(tmp_path, one_torch_thread):
    from test_flower_loop import InProcessGrid, _nodes

    from fedlora.config import load_config
    from fedlora.engines.flower import FlowerOptions
    from fedlora.engines.flower_client import make_client_app
    from fedlora.engines.flower_server import run_on_grid
    from fedlora.experiment import make_run_dir
    from fedlora.federated_run import Run
    from fedlora.metrics import read_metrics

    cfg = load_config(None, ["strategy.name=fedsvd", "federation.num_clients=2", "federation.rounds=2",
                             "federation.local_steps=3", "federation.batch_size=16", "federation.partition=iid",
                             "data.max_length=32", "data.max_eval_examples=200", "output.progress=false",
                             "output.save_adapter=false"])
    execute(Run(cfg, make_run_dir(cfg, str(tmp_path / "local"))))
    run_on_grid(Run(cfg, make_run_dir(cfg, str(tmp_path / "flower"))), InProcessGrid(make_client_app(), _nodes(2)),
                FlowerOptions(node_wait_s=0.0))
    local, flower = read_metrics(tmp_path / "local"), read_metrics(tmp_path / "flower")
    for a, b in zip(local, flower):
        # Round 2 trains on the re-factored A, which only the downlink carries: the losses agree only if it did.
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-5 and abs(a["eval_loss"] - b["eval_loss"]) < 1e-5
        assert a["bytes_up"] == b["bytes_up"] and a["bytes_down"] == b["bytes_down"]
