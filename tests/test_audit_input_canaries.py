"""Black-box input canaries for the causal LM (issue 27): random-token sequences from the seed, about half of them
inserted into client 0's records (classic prompt/response and TRL records with per-token loss masks), each scored
by its own response loss; and one tiny sample-level audit of the embedded SmolLM2 that reports them."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedlora.audit.input_canaries import PROMPT_TOKENS, losses, random_token_canaries, with_examples
from fedlora.audit.sample_run import fair_coins
from fedlora.encoding import EncodedData
from fedlora.tasks.causal_lm import CausalLM


@pytest.fixture(scope="module")
def tok():
    from fedlora.host import load_tokenizer

    return load_tokenizer("embedded:SmolLM2-135M-Instruct")


def test_random_token_canaries_are_fixed_by_the_seed_and_fit(tok):
    a, b = random_token_canaries(tok, 40, 7, 64), random_token_canaries(tok, 40, 7, 64)
    assert all(np.array_equal(x, y) for x, y in zip(a.input_ids, b.input_ids)) and a.answers == b.answers
    other = random_token_canaries(tok, 40, 8, 64)
    assert not any(np.array_equal(x, y) for x, y in zip(a.input_ids, other.input_ids))
    assert len({tuple(x) for x in a.input_ids}) == 40  # every canary its own sequence
    ids = np.concatenate(a.input_ids)
    assert not set(ids.tolist()) & set(tok.all_special_ids) and ids.max() < len(tok)
    assert (a.prompt_len == PROMPT_TOKENS).all() and all(len(x) == 24 for x in a.input_ids)
    assert (a.labels == -1).all()
    short = random_token_canaries(tok, 3, 7, 12)  # cut to data.max_length, a response token always left
    assert all(len(x) <= 12 for x in short.input_ids) and (short.prompt_len < 12).all()


def test_fair_coins_insert_about_half_and_are_fixed_by_the_seed():
    white, black = fair_coins(3, 2000, 1000)
    assert 900 < white.sum() < 1100 and 430 < black.sum() < 570
    again = fair_coins(3, 2000, 1000)
    assert np.array_equal(white, again[0]) and np.array_equal(black, again[1])
    assert not np.array_equal(black, fair_coins(4, 2000, 1000)[1])


def _records(tok, masks: bool) -> EncodedData:
    """Two chat records as the causal-LM task encodes them: classic (prompt length) or TRL (per-token masks)."""
    def encoded(messages, opening=False):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=opening)
        return np.asarray(tok(text, add_special_tokens=False)["input_ids"], np.int64)

    pairs = [("Two plus two?", "four"), ("Capital of France?", "Paris")]
    ids = [encoded([{"role": "user", "content": q}, {"role": "assistant", "content": r}]) for q, r in pairs]
    plen = np.array([len(encoded([{"role": "user", "content": q}], True)) for q, _ in pairs], np.int64)
    mask = [np.arange(len(x)) >= p for x, p in zip(ids, plen)] if masks else None
    return EncodedData(ids, np.zeros(2, np.int64), plen, ["four", "Paris"], mask)


@pytest.mark.parametrize("masks", [False, True], ids=["prompt-response", "loss-masks"])
def test_canaries_join_the_client_records_with_the_loss_on_their_response(tok, masks):
    client, canaries = _records(tok, masks), random_token_canaries(tok, 4, 0, 64)
    joined = with_examples(client, canaries.subset(np.array([1, 3])))
    assert len(joined) == 4 and joined.answers == ["four", "Paris", canaries.answers[1], canaries.answers[3]]
    assert (joined.loss_mask is not None) == masks
    batch = CausalLM().collate(joined, np.arange(4), tok.pad_token_id)
    for row, (i, source) in enumerate([(0, client), (1, client), (1, canaries), (3, canaries)]):
        ids, p = source.input_ids[i], int(source.prompt_len[i])
        labels = batch["labels"][row, -len(ids):].numpy()
        assert np.array_equal(labels[p:], ids[p:]) and (labels[:p] == -100).all()  # loss on the response only
    with pytest.raises(ValueError):
        with_examples(EncodedData(client.input_ids, client.labels), canaries)  # classification data: refused


class Bigram(torch.nn.Module):
    """A stand-in LM whose next-token logits depend on the current token only (so each loss is known by hand)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = torch.randn(97, vocab, generator=torch.Generator().manual_seed(0))

    def forward(self, input_ids, attention_mask, logits_to_keep):
        return SimpleNamespace(logits=self.table[input_ids % 97][:, -logits_to_keep:])


def test_each_canary_is_scored_by_its_own_response_loss(tok):
    canaries = random_token_canaries(tok, 7, 1, 30)
    data = with_examples(_records(tok, False), canaries)  # real records of other lengths share the batches
    model = Bigram(len(tok))
    got = losses(CausalLM(), model, data, 4, tok.pad_token_id, "cpu")
    table = model.table.double()
    for i, (ids, p) in enumerate(zip(data.input_ids, data.prompt_len)):
        logp = torch.log_softmax(table[torch.as_tensor(ids[p - 1:-1]) % 97], dim=-1)
        want = -logp[torch.arange(len(ids) - p), torch.as_tensor(ids[p:])].mean()
        assert got[i] == pytest.approx(float(want), rel=1e-5), i


def test_a_sample_level_audit_of_the_llm_reports_its_random_token_canaries(tmp_path, one_torch_thread):
    from fedlora.audit import audit

    rows = [{"prompt": f"What is {a} plus {a}?", "completion": str(2 * a)} for a in range(24)]
    path = tmp_path / "pc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = audit(None, overrides=["task=causal-lm", "data.name=jsonl", f"data.path={path}", "data.max_length=64",
                                    "data.test_fraction=0.25", "data.max_eval_examples=2", "federation.num_clients=1",
                                    "federation.rounds=1", "federation.partition=iid", "privacy.mode=sample",
                                    "privacy.noise_multiplier=1.0", "privacy.batch_size=4", "privacy.local_steps=2",
                                    "eval.batch_size=8", "eval.max_new_tokens=1", "output.progress=false"],
                   canaries=16, out=tmp_path / "run")
    rep = result.report
    b = rep["black_box"]
    assert "skipped" not in b and "random-token" in b["threat_model"]
    # 16 canaries of each kind; seed 0's coins insert 8 of the random-token ones (fair_coins).
    assert b["canaries"] == {"total": 16, "inserted": 8, "unseen": 8} and rep["dp_steps"] == 2
    assert b["epsilon_lower_bound"]["canaries"] == 16 and b["epsilon_lower_bound"]["epsilon"] >= 0
    one = b["epsilon_one_shot"]
    assert np.isfinite(one["epsilon"]) and one["std_inserted"] > 0 and one["std_null"] > 0  # real loss drops
    assert one["mean_inserted"] != one["mean_null"]
    report = (result.audit_dir / "report.md").read_text()
    assert "| black-box: lower bound" in report and "random-token sequence" in report
    assert json.loads((result.audit_dir / "audit.json").read_text())["black_box"]["canaries"]["total"] == 16
    assert not (tmp_path / "run" / "adapter").exists()
