"""Batched clients (fedlora.batched): one round trained together gives the same client updates as training the
clients one after another: float64 on a tiny random model to 1e-8, float32 on the embedded model within a bound
justified below; for ffa, fedit and a mixed-rank method; and the rounds it cannot keep exact are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlora import lora
from fedlora.batched import BatchedRound, why_not_batched
from fedlora.client import ClientTrainer, EncodedData, shuffled_batches
from fedlora.config import load_config
from fedlora.federated_run import build_strategy
from fedlora.host import ModelHost
from fedlora.server import Server


def tiny_double_model(monkeypatch):
    """A 2-layer random BERT classifier in float64 (no download; exactness needs float64)."""
    from transformers import BertConfig, BertForSequenceClassification

    from fedlora.tasks.classification import SequenceClassification

    def base_model(self, cfg, num_outputs):
        torch.manual_seed(cfg.seed)
        config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, num_labels=num_outputs)
        return BertForSequenceClassification(config).double().eval()

    monkeypatch.setattr(SequenceClassification, "base_model", base_model)


def client_data(rng, n: int) -> EncodedData:
    """Sentences of varied lengths (so union batches pad more than the clients' own)."""
    return EncodedData([rng.integers(1000, 3000, size=int(rng.integers(4, 20))) for _ in range(n)],
                       rng.integers(0, 2, size=n))


def both_ways(cfg, clients: int):
    torch.manual_seed(cfg.seed)
    host = ModelHost(cfg, 2, set(cfg.client_ranks()))
    dims = lora.module_dims(host.model)
    trainer = ClientTrainer(cfg, host, build_strategy(cfg, dims))
    head = lora.get_head(host.model, host.ensure_rank(max(cfg.client_ranks())))
    rng = np.random.default_rng(0)
    data = [client_data(rng, int(n)) for n in rng.integers(12, 40, size=clients)]
    server = Server(cfg, trainer.strategy, dims, head, [len(d) for d in data])
    # A second round too: the downlink is then an aggregate, not the seeded init.
    for _ in range(2):
        jobs = [(c, server.downlink(c), data[c]) for c in range(clients)]
        assert why_not_batched(trainer, jobs[0][1].round, private=False) is None
        one = [trainer.train(c, down, d) for c, down, d in jobs]
        together = BatchedRound(trainer).train(jobs)
        yield jobs, one, together
        server.finish_round(one, list(range(clients)))


def change_gap(jobs, one, together) -> float:
    """max over clients of ‖Δ_batched − Δ_one-by-one‖ / ‖Δ_one-by-one‖ over every trained factor and the head."""
    worst = 0.0
    for (c, down, _), a, b in zip(jobs, one, together):
        assert (a.client_id, a.rank, a.steps, a.samples) == (b.client_id, b.rank, b.steps, b.samples)
        num = den = 0.0
        for m, f in a.factors.items():
            start = down.factors[m]
            for x, y, s in ((f.A, b.factors[m].A, start.A), (f.B, b.factors[m].B, start.B * (start.scale / f.scale))):
                num += float(np.sum((np.float64(y) - x) ** 2))
                den += float(np.sum((np.float64(x) - s) ** 2))
        for k, h in a.head.items():
            num += float(np.sum((np.float64(b.head[k]) - h) ** 2))
            den += float(np.sum((np.float64(h) - down.head[k]) ** 2))
        worst = max(worst, (num / den) ** 0.5)
    return worst


TINY = ["federation.num_clients=4", "federation.local_steps=3", "federation.batch_size=8", "optim.lr=0.01"]
FLOAT64 = ["model.dtype=float64", "model.device=cpu"]


@pytest.mark.parametrize("method, ranks, batching", [
    ("ffa", "[4]", "random"), ("fedit", "[4]", "random"), ("rbla", "[2, 4, 8, 4]", "random"),
    ("ffa", "[2, 8, 4, 4]", "random"), ("ffa", "[2, 8, 4, 4]", "length-buckets")])
def test_batched_equals_one_by_one_in_float64(method, ranks, batching, monkeypatch, one_torch_thread):
    """SGD with momentum: the update is linear in the gradients, so the two ways agree to float64 rounding."""
    tiny_double_model(monkeypatch)
    cfg = load_config(None, [*TINY, *FLOAT64, "optim.name=sgd", "optim.lr=0.5", "optim.momentum=0.9",
                             f"strategy.name={method}", f"federation.ranks={ranks}", f"federation.batching={batching}"])
    for jobs, one, together in both_ways(cfg, 4):
        for a, b in zip(one, together):
            assert a.train_loss == pytest.approx(b.train_loss, rel=1e-10, abs=1e-12)
            for m, f in a.factors.items():
                assert f.A.dtype == np.float64
                np.testing.assert_allclose(b.factors[m].A, f.A, rtol=1e-8, atol=1e-10)
                np.testing.assert_allclose(b.factors[m].B, f.B, rtol=1e-8, atol=1e-10)
            for k, h in a.head.items():
                np.testing.assert_allclose(b.head[k], h, rtol=1e-8, atol=1e-10)
        assert change_gap(jobs, one, together) < 1e-8


def test_batched_equals_one_by_one_with_adamw_in_float64(monkeypatch, one_torch_thread):
    """AdamW divides by sqrt(v) + 1e-8: on an element whose gradient is ~1e-10 it multiplies the gradient's
    float64 rounding (~1e-16 absolute, summation order differs in the union batch) by lr/eps = 1e6. The change
    as a whole still agrees to 1e-6 of its size."""
    tiny_double_model(monkeypatch)
    cfg = load_config(None, [*TINY, *FLOAT64, "strategy.name=fedit"])
    for jobs, one, together in both_ways(cfg, 4):
        assert change_gap(jobs, one, together) < 1e-6


def test_rounds_batching_cannot_keep_exact_are_refused(monkeypatch):
    tiny_double_model(monkeypatch)
    for overrides, why in ((["strategy.name=hetlora", "federation.ranks=[4, 8]"], "penalty"),
                           (["strategy.name=fedsa"], "keeps parts"), (["strategy.name=fedsb"], "core"),
                           (["strategy.name=ffa"], None)):
        cfg = load_config(None, [*TINY, *overrides])
        host = ModelHost(cfg, 2, set(cfg.client_ranks()))
        trainer = ClientTrainer(cfg, host, build_strategy(cfg, lora.module_dims(host.model)))
        if why is None:  # DP-SGD rounds train together too (tests/test_dpsgd_batched.py)
            assert why_not_batched(trainer, 1, private=True) is None
        else:
            assert why in why_not_batched(trainer, 1, private=False)


@pytest.mark.slow
def test_batched_equals_one_by_one_on_the_embedded_model_in_float32(one_torch_thread):
    """float32 and AdamW: Adam's first steps move every element by about ±lr whatever its gradient's size, so an
    element whose gradient is within float32 rounding of zero (different summation order and padding width in
    the union batch) can step the other way. Such elements are rare: the whole change differs by well under 1%
    of its size, and the losses agree to 1e-4."""
    cfg = load_config(None, [*TINY, "strategy.name=ffa", "data.max_length=32"])
    for jobs, one, together in both_ways(cfg, 4):
        for a, b in zip(one, together):
            assert a.train_loss == pytest.approx(b.train_loss, abs=1e-4)
        assert change_gap(jobs, one, together) < 1e-2


def test_length_buckets_regroup_the_same_examples_into_batches_of_similar_length():
    rng = np.random.default_rng(3)
    lengths = [int(x) for x in rng.integers(3, 60, size=50)]
    for steps, batch in ((4, 8), (9, 16)):  # within one pass, and across passes (examples repeat)
        plain = shuffled_batches(50, batch, steps, np.random.default_rng(7))
        bucketed = shuffled_batches(50, batch, steps, np.random.default_rng(7), lengths)
        # The same examples, as many times each, in batches of the same sizes.
        assert sorted(np.concatenate(plain).tolist()) == sorted(np.concatenate(bucketed).tolist())
        assert sorted(map(len, plain)) == sorted(map(len, bucketed))
        # Batches do not overlap in length: sorted by their shortest row, each one's longest is at most the
        # next one's shortest; so the padding (rows x longest - tokens) can only shrink.
        spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in bucketed)
        assert all(hi <= nxt_lo for (_, hi), (nxt_lo, _) in zip(spans, spans[1:]))

        def padding(batches):
            return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)

        assert padding(bucketed) < padding(plain)


def test_length_buckets_are_refused_under_dp_sgd_in_one_line():
    from fedlora.config import ConfigError

    with pytest.raises(ConfigError, match="length-buckets does not work with privacy.mode=sample"):
        load_config(None, ["federation.batching=length-buckets", "privacy.mode=sample", "privacy.epsilon=3"])
    assert load_config(None, ["federation.batching=length-buckets", "privacy.mode=client", "privacy.epsilon=3",
                              "federation.num_clients=20"]).federation.batching == "length-buckets"


@pytest.mark.parametrize("mode, expected", [("auto", True), ("true", True), ("false", False)])
def test_the_local_engine_batches_as_federation_batched_clients_says(mode, expected, monkeypatch):
    """The config key parses from the command line (true/false are booleans, "auto" text) and decides the path."""
    from types import SimpleNamespace

    from fedlora.engines.local import LocalTransport
    from fedlora.progress import RunProgress

    tiny_double_model(monkeypatch)
    cfg = load_config(None, [*TINY, f"federation.batched_clients={mode}"])
    host = ModelHost(cfg, 2, set(cfg.client_ranks()))
    transport = LocalTransport.__new__(LocalTransport)  # only what `_batched` reads
    transport.trainer = ClientTrainer(cfg, host, build_strategy(cfg, lora.module_dims(host.model)))
    transport.client_privacy, transport._said_why = {}, False
    run = SimpleNamespace(cfg=cfg, server=SimpleNamespace(round=0), progress=RunProgress(enabled=False))
    assert transport._batched(run, [0, 1, 2]) is expected
    assert transport._batched(run, [0]) is False  # one client: nothing to batch
