"""DP-SGD without padding waste (fedlora.micro_batches + Opacus' virtual steps): each Poisson batch processed as
length-grouped micro-batches whose clipped per-example gradients are summed before the one noisy step gives the
same step as the whole batch padded to its longest row: float64 on a tiny random model to 1e-8, noise on and off,
flat and group clipping; the accountant is charged once per Poisson batch either way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlora import lora
from fedlora.client import ClientTrainer
from fedlora.config import load_config
from fedlora.dp import SamplePrivacy
from fedlora.federated_run import build_strategy
from fedlora.host import ModelHost
from fedlora.micro_batches import length_chunks
from fedlora.server import Server
from test_batched import FLOAT64, client_data, tiny_double_model

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")

DP = ["federation.num_clients=3", "privacy.mode=sample", "privacy.batch_size=12", "privacy.local_steps=3",
      "privacy.optim.lr=0.5", *FLOAT64]


def trainer_and_jobs(cfg, clients: int, seed: int = 0, make_data=None):
    torch.manual_seed(cfg.seed)
    host = ModelHost(cfg, 0 if cfg.task == "causal-lm" else 2, set(cfg.client_ranks()))
    dims = lora.module_dims(host.model)
    trainer = ClientTrainer(cfg, host, build_strategy(cfg, dims))
    head = lora.get_head(host.model, host.ensure_rank(max(cfg.client_ranks())))
    rng = np.random.default_rng(seed)
    data = [(make_data or client_data)(rng, int(n)) for n in rng.integers(20, 40, size=clients)]
    server = Server(cfg, trainer.strategy, dims, head, [len(d) for d in data])
    return trainer, server, data


def assert_same_update(a, b, rtol=1e-8, atol=1e-10):
    assert (a.client_id, a.rank, a.steps, a.samples) == (b.client_id, b.rank, b.steps, b.samples)
    assert a.train_loss == pytest.approx(b.train_loss, rel=1e-10, abs=1e-12)
    for m, f in a.factors.items():
        assert f.A.dtype == np.float64
        np.testing.assert_allclose(b.factors[m].A, f.A, rtol=rtol, atol=atol)
        np.testing.assert_allclose(b.factors[m].B, f.B, rtol=rtol, atol=atol)
    for k, h in a.head.items():
        np.testing.assert_allclose(b.head[k], h, rtol=rtol, atol=atol)


@pytest.mark.parametrize("extra", [
    ["strategy.name=ffa", "privacy.noise_multiplier=0", "privacy.clip=0.05"],
    ["strategy.name=fedit", "privacy.noise_multiplier=0.7", "privacy.clip=0.3"],
    ["strategy.name=ffa", "privacy.noise_multiplier=0.7", "privacy.clipping=group", "privacy.lora_clip=0.01"]])
def test_micro_batched_dp_sgd_equals_the_padded_step_in_float64(extra, monkeypatch, one_torch_thread):
    tiny_double_model(monkeypatch)
    cfg = load_config(None, [*DP, *extra])
    trainer, server, data = trainer_and_jobs(cfg, 2)
    for c in range(2):
        down = server.downlink(c)
        state = SamplePrivacy.for_client(cfg, len(data[c]))
        twin = SamplePrivacy.from_state_dict(state.state_dict())  # same noise root: the same noise draws
        trainer.dp_tokens_per_chunk = 0  # the padded step
        padded = trainer.train(c, down, data[c], dp=state)
        trainer.dp_tokens_per_chunk = 40  # a few rows per micro-batch
        micro = trainer.train(c, down, data[c], dp=twin)
        assert_same_update(padded, micro)
        # The same steps charged: one per Poisson batch (empty ones included), at the same (sigma, q).
        assert state.accountant.history == twin.accountant.history
        assert state.accountant.total_steps == cfg.local_steps()
        # And the batches really were cut: some Poisson batch holds more than one micro-batch.
        rng = np.random.default_rng([cfg.seed, down.round, c])
        batches = state.batches(cfg, len(data[c]), rng)
        assert any(len(length_chunks([len(data[c].input_ids[i]) for i in b], 40)) > 1 for b in batches)


def test_length_chunks_keep_every_row_once_within_the_budget():
    rng = np.random.default_rng(1)
    lengths = [int(x) for x in rng.integers(1, 50, size=200)]
    chunks = length_chunks(lengths, 256)
    assert sorted(np.concatenate(chunks).tolist()) == list(range(200))
    assert all(len(c) == 1 or len(c) * max(lengths[i] for i in c) <= 256 for c in chunks)
    assert length_chunks(lengths, 10**9)[0].tolist() == np.argsort(lengths, kind="stable").tolist()
