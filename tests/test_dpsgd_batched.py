"""Batched DP-SGD clients (fedlora.batched_private): a round's DP-SGD clients trained together give exactly the
updates, losses, accountant histories and reports of training them one by one (Opacus, micro-batched): float64 on
a tiny random model to 1e-8, with noise off and with each client's own noise on (the same draws), flat and group
clipping, mixed ranks; the server verifies every report."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.batched import why_not_batched
from fedlora.batched_private import PrivateBatchedRound
from fedlora.config import load_config
from fedlora.dp import SamplePrivacy
from fedlora.dp.mechanisms import SampleLevelDP
from test_batched import tiny_double_model
from test_dpsgd_micro_batches import DP, assert_same_update, trainer_and_jobs

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


@pytest.mark.parametrize("extra", [
    ["strategy.name=ffa", "privacy.noise_multiplier=0", "privacy.clip=0.05", "federation.ranks=[2, 8, 4]"],
    ["strategy.name=fedit", "privacy.noise_multiplier=0.7", "privacy.clip=0.3"],
    ["strategy.name=ffa", "privacy.noise_multiplier=0.7", "privacy.clipping=group", "privacy.lora_clip=0.01",
     "optim.name=adamw"]])
def test_batched_dp_sgd_equals_one_by_one_in_float64(extra, monkeypatch, one_torch_thread):
    tiny_double_model(monkeypatch)
    cfg = load_config(None, [*DP, *extra])
    trainer, server, data = trainer_and_jobs(cfg, 3)
    states = {c: SamplePrivacy.for_client(cfg, len(data[c])) for c in range(3)}
    twins = {c: SamplePrivacy.from_state_dict(s.state_dict()) for c, s in states.items()}  # same noise roots
    mechanism = SampleLevelDP(cfg)
    for _ in range(2):  # a second round starts from an aggregate
        jobs = [(c, server.downlink(c), data[c]) for c in range(3)]
        assert why_not_batched(trainer, jobs[0][1].round, private=True) is None
        trainer.dp_tokens_per_chunk = 40
        one = [trainer.train(c, down, d, dp=states[c]) for c, down, d in jobs]
        together = PrivateBatchedRound(trainer, tokens_per_chunk=60).train(
            [(c, down, d, twins[c]) for c, down, d in jobs])
        for c, (a, b) in enumerate(zip(one, together)):
            assert_same_update(a, b)
            assert states[c].accountant.history == twins[c].accountant.history
            assert a.privacy == b.privacy
            verified = mechanism.check_report(b, server.privacy.get(c), len(data[c]), jobs[0][1].round)
            assert isinstance(verified, dict), verified  # the server's own check of the batched client's report
        assert any(np.any(np.abs(f.B) > 0) for u in together for f in u.factors.values())
        server.finish_round(together, list(range(3)))
        assert set(server.privacy) == {0, 1, 2}


@pytest.mark.parametrize("model_type, extra", [("roberta", ["model.pooling=cls"]), ("llama", ["task=causal-lm"])])
def test_batched_dp_sgd_on_a_multi_layer_head_and_a_causal_lm(model_type, extra, tmp_path, one_torch_thread):
    """RoBERTa's own head (dense, tanh, out_proj: every row through its owner's layers) and a decoder's causal-LM
    loss (left padding, loss on the response only): batched equals one by one to 1e-8 in float64, noise on."""
    from fedlora.encoding import EncodedData
    from tiny_models import minilm_tokenizer, save_tiny_model

    causal = model_type == "llama"
    folder = save_tiny_model(tmp_path / model_type, model_type, minilm_tokenizer(), causal=causal)
    cfg = load_config(None, [*DP, "strategy.name=fedit", "privacy.noise_multiplier=0.7", "privacy.clip=0.3",
                             f"model.name={folder}", *extra])
    import test_dpsgd_micro_batches as micro
    from test_batched import client_data

    def lm_data(rng, n):  # prompts and responses of varied lengths
        plain = client_data(rng, n)
        return EncodedData(plain.input_ids, plain.labels, np.array([int(rng.integers(1, len(x) - 1))
                                                                   for x in plain.input_ids]))

    trainer, server, data = micro.trainer_and_jobs(cfg, 3, make_data=lm_data if causal else None)
    states = {c: SamplePrivacy.for_client(cfg, len(data[c])) for c in range(3)}
    twins = {c: SamplePrivacy.from_state_dict(s.state_dict()) for c, s in states.items()}
    jobs = [(c, server.downlink(c), data[c]) for c in range(3)]
    trainer.dp_tokens_per_chunk = 40
    one = [trainer.train(c, down, d, dp=states[c]) for c, down, d in jobs]
    together = PrivateBatchedRound(trainer, tokens_per_chunk=60).train([(c, down, d, twins[c]) for c, down, d in jobs])
    for a, b in zip(one, together):
        if causal:
            assert a.train_loss == pytest.approx(b.train_loss, rel=1e-6)
            for m, f in a.factors.items():
                np.testing.assert_allclose(b.factors[m].B, f.B, rtol=1e-4, atol=1e-6)
                np.testing.assert_allclose(b.factors[m].A, f.A, rtol=1e-4, atol=1e-6)
        else:
            assert_same_update(a, b)
    assert bool(together[0].head) != causal  # the classifier's head trains (and travels); the LM has none
