"""Instruction data in TRL's formats for task=causal-lm: format detection, the bad-record report, the exact
per-token loss mask of multi-turn conversations (against an independent per-turn reference), the collate and
loss reading that mask, and partitions by a key column."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedlora.config import load_config
from fedlora.encoding import EncodedData
from fedlora.tasks.causal_lm import CausalLM
from fedlora.tasks.chat_data import detect_format, read_rows, source_columns, to_records

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"},
     {"role": "user", "content": "And times 4?"}, {"role": "assistant", "content": "20, since 5 x 4 = 20."}],
    [{"role": "system", "content": "Reply in French."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Bonjour"}, {"role": "user", "content": "Thanks"},
     {"role": "assistant", "content": "De rien !"}, {"role": "user", "content": "Bye"},
     {"role": "assistant", "content": "Au revoir."}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue"}],
]
BAD = [
    {"messages": [{"content": "no role"}, {"role": "assistant", "content": "x"}]},
    {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]},
    {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]},
    {"messages": [{"role": "user", "content": "only a question"}]},
    {"messages": []},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    return str(path)


def test_formats_are_detected_from_the_columns_and_the_classic_columns_win():
    data = load_config(None, ["task=causal-lm"]).data
    assert detect_format({"messages", "source"}, data) == "messages"
    assert detect_format({"prompt", "completion"}, data) == "prompt-completion"
    assert detect_format({"text"}, data) == "text"
    assert detect_format({"prompt", "response"}, data) is None  # data.prompt_column / data.response_column
    forced = load_config(None, ["task=causal-lm", "data.format=prompt-response"]).data
    assert detect_format({"messages"}, forced) is None


def test_bad_records_are_counted_per_reason_and_good_ones_kept(tmp_path):
    cfg = load_config(None, ["task=causal-lm"])
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS] + BAD)
    rows, unparseable = read_rows("jsonl", path)
    records = to_records(rows, "messages", cfg.data, unparseable)
    assert len(records) == 3 and records.rows_read == 9
    assert dict(records.bad) == {"missing_role": 1, "unknown_role": 1, "empty_content": 1, "no_assistant_turn": 1,
                                 "missing_messages": 1, "unparseable_line": 1}
    assert "9 read, 3 kept" in records.summary() and "no_assistant_turn=1" in records.summary()


def test_system_prompts_per_record_and_prompt_completion_from_csv(tmp_path):
    cfg = load_config(None, ["task=causal-lm", "data.system_prompt=Be brief."])
    csv = tmp_path / "pc.csv"
    csv.write_text('prompt,completion,system\nWhat is 1+1?,2,Answer with digits.\nCapital of France?,Paris,\n'
                   'Empty answer?,,\n')
    assert source_columns("csv", str(csv)) == {"prompt", "completion", "system"}
    records = to_records(*read_rows("csv", str(csv))[:1], "prompt-completion", cfg.data)
    assert records.bad == {"empty_content": 1}
    first, second = records.conversations
    assert first[0] == {"role": "system", "content": "Answer with digits."}  # the record's own system column
    assert second[0] == {"role": "system", "content": "Be brief."}  # data.system_prompt by default
    assert [m["role"] for m in first] == ["system", "user", "assistant"] and first[2]["content"] == "2"


def test_messages_in_csv_cells_and_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    cfg = load_config(None, ["task=causal-lm"])
    frame = pd.DataFrame({"messages": [json.dumps(m) for m in CONVERSATIONS], "source": ["a", "b", "a"]})
    frame.to_csv(tmp_path / "c.csv", index=False)
    frame.to_parquet(tmp_path / "c.parquet")
    for name in ("csv", "parquet"):
        path = str(tmp_path / f"c.{name}")
        assert detect_format(source_columns(name, path), cfg.data) == "messages"
        records = to_records(read_rows(name, path)[0], "messages", cfg.data)
        assert records.conversations[1][-1] == {"role": "assistant", "content": "Au revoir."} and not records.bad


def test_collate_and_loss_read_a_per_token_mask_and_match_the_contiguous_path():
    """A mask that marks a contiguous response at the end gives the same labels as prompt_len; a mask with
    gaps labels exactly its tokens."""
    rng = np.random.default_rng(0)
    ids = [rng.integers(5, 50, size=n) for n in (7, 11, 5)]
    plen = np.array([3, 6, 2])
    classic = EncodedData(ids, np.zeros(3, np.int64), plen, ["a"] * 3)
    masks = [np.arange(len(s)) >= p for s, p in zip(ids, plen)]
    masked = EncodedData(ids, np.zeros(3, np.int64), plen, ["a"] * 3, masks)
    task, idx = CausalLM(), np.arange(3)
    a, b = task.collate(classic, idx, 0), task.collate(masked, idx, 0)
    assert all(bool((a[k] == b[k]).all()) for k in a)
    gaps = [np.isin(np.arange(len(s)), [1, 2, len(s) - 1]) for s in ids]
    labels = task.collate(EncodedData(ids, np.zeros(3, np.int64), plen, ["a"] * 3, gaps), idx, 0)["labels"].numpy()
    for row, s in enumerate(ids):
        got = labels[row, labels.shape[1] - len(s):]
        assert (got[gaps[row]] == s[gaps[row]]).all() and (got[~gaps[row]] == -100).all()


def test_loss_covers_the_earliest_masked_token():
    """The loss reads logits from the batch's earliest loss token on: a fake model records how many it kept."""
    import torch

    class Fake(torch.nn.Module):
        def forward(self, input_ids, attention_mask, logits_to_keep):
            self.kept = logits_to_keep
            return type("Out", (), {"logits": torch.zeros(input_ids.shape[0], logits_to_keep, 60)})()

    ids = [np.arange(5, 15), np.arange(5, 11)]
    gaps = [np.isin(np.arange(10), [2, 9]), np.isin(np.arange(6), [5])]
    batch = CausalLM().collate(EncodedData(ids, np.zeros(2, np.int64), np.array([1, 1]), ["", ""], gaps),
                               np.arange(2), 0)
    fake = Fake()
    loss = CausalLM().loss_per_example(fake, batch)
    assert fake.kept == 9  # tokens 2..9 of the 10-token row: 8 targets + 1
    assert torch.allclose(loss, torch.full((2,), float(np.log(60))))  # uniform logits: every counted token
    # Classic responses at the end (no mask): the longest response + 1, as before per-token masks existed.
    classic = CausalLM().collate(EncodedData(ids, np.zeros(2, np.int64), np.array([4, 3]), ["", ""]), np.arange(2), 0)
    CausalLM().loss_per_example(fake, classic)
    assert fake.kept == 10 - 4 + 1


def test_a_local_hugging_face_dataset_folder_in_messages_format(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "chats"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS))
    cfg = load_config(None, ["task=causal-lm"])
    assert detect_format(source_columns(str(folder), None), cfg.data) == "messages"
    records = to_records(read_rows(str(folder), None)[0], "messages", cfg.data)
    assert records.conversations == CONVERSATIONS and not records.bad


@pytest.fixture(scope="module")
def tokenizer():
    from fedlora.architectures import EMBEDDED_LLM
    from fedlora.models import load_tokenizer

    return load_tokenizer(EMBEDDED_LLM)


def _template_ids(tok, messages, generation_prompt=False):
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    out = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
    return list(out)


@pytest.mark.slow
def test_multi_turn_mask_is_exactly_every_assistant_turn(tmp_path, tokenizer):
    """Reference, computed per turn from token ids: assistant turn k's loss tokens are those after the
    tokenized conversation-up-to-k with the assistant header, up to the tokenized conversation through k,
    less its trailing whitespace tokens."""
    from fedlora.tasks.chat_encoding import encode_records

    cfg = load_config(None, ["task=causal-lm", "data.max_length=512"])
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS] + BAD)
    records = to_records(*read_rows("jsonl", path)[:1], "messages", cfg.data)
    enc, names = encode_records(tokenizer, records, 512)
    assert len(enc) == 3 and names == ["any"]
    for i, messages in enumerate(CONVERSATIONS):
        full = _template_ids(tokenizer, messages)
        assert enc.input_ids[i].tolist() == full
        expected = np.zeros(len(full), dtype=bool)
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(_template_ids(tokenizer, messages[:k], generation_prompt=True))
            through = _template_ids(tokenizer, messages[: k + 1])
            assert through == full[: len(through)]
            end = len(through)
            while not tokenizer.decode(through[end - 1 : end]).strip():
                end -= 1
            expected[start:end] = True
        assert enc.loss_mask[i].tolist() == expected.tolist()
        # What carries the loss is each assistant content and its end-of-turn token, nothing else.
        turns = [m["content"] + tokenizer.eos_token for m in messages if m["role"] == "assistant"]
        assert tokenizer.decode(enc.input_ids[i][enc.loss_mask[i]]) == "".join(turns)
        # Held-out scoring generates from the conversation before the last answer and compares with it.
        assert enc.prompt_len[i] == len(_template_ids(tokenizer, messages[:-1], generation_prompt=True))
        assert enc.answers[i] == messages[-1]["content"]


@pytest.mark.slow
def test_over_long_conversations_are_counted_not_trained(tmp_path, tokenizer):
    from fedlora.tasks.chat_encoding import encode_records

    cfg = load_config(None, ["task=causal-lm"])
    long_question = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    records = to_records([{"messages": m} for m in CONVERSATIONS + [long_question]], "messages", cfg.data)
    enc, _ = encode_records(tokenizer, records, 48)
    assert records.bad == {"too_long": 1} and len(enc) == 3 and "too_long=1" in records.summary()
    # Cut conversations keep their start; what is left of the assistant turns still carries the loss.
    assert all(len(x) <= 48 and m.any() for x, m in zip(enc.input_ids, enc.loss_mask))
    # The first conversation (71 tokens) loses its second answer: it is scored on the first, "5".
    assert len(_template_ids(tokenizer, CONVERSATIONS[0])) > 48 and enc.answers[0] == "5"
    assert tokenizer.decode(enc.input_ids[0][enc.loss_mask[0]]) == "5" + tokenizer.eos_token
    texts = to_records([{"text": "The cat sat on the mat."}, {"text": ""}], "text", cfg.data)
    enc, _ = encode_records(tokenizer, texts, 48)
    assert texts.bad == {"empty_text": 1} and enc.loss_mask[0].sum() == len(enc.input_ids[0]) - 1


def _keyed(tmp_path, n_per_key=8, keys=("math", "code", "chat")):
    rows = [{"messages": [{"role": "user", "content": f"{key} question {i}"},
                          {"role": "assistant", "content": f"{key} answer {i}"}], "source": key}
            for key in keys for i in range(n_per_key)]
    rows.append({"messages": CONVERSATIONS[2]})  # no source: counted, not given to a client
    return _jsonl(tmp_path / "keyed.jsonl", rows)


@pytest.mark.slow
def test_partition_by_a_key_column_gives_each_client_the_records_of_some_keys(tmp_path, tokenizer):
    from fedlora.experiment import prepare_data

    path = _keyed(tmp_path)
    base = ["task=causal-lm", "data.name=jsonl", f"data.path={path}", "data.partition_column=source",
            "federation.num_clients=3", "data.test_fraction=0.25"]
    data = prepare_data(load_config(None, base + ["federation.partition=label-skew"]), tokenizer)
    assert data.label_names == ["chat", "code", "math"]
    assert "missing_partition_key=1" in data.load_summary and "unparseable_line=1" in data.load_summary
    held_keys = []
    for client, stats in zip(data.clients, data.partition_stats):
        keys = {data.label_names[k] for k in client.labels}
        # The records a client holds really come from the keys its labels say (the answer text names the key).
        assert all(a.split()[0] == data.label_names[k] for a, k in zip(client.answers, client.labels))
        assert len(keys) == 2 and sum(1 for c in stats["label_counts"] if c) == 2
        held_keys.append(keys)
    assert set().union(*held_keys) == {"chat", "code", "math"}
    assert sum(len(c) for c in data.clients) + len(data.test) == 24
    # Every key is in the held-out set (the split is stratified by key); iid mixes every key on every client.
    assert set(data.test.labels.tolist()) == {0, 1, 2}
    iid = prepare_data(load_config(None, base + ["federation.partition=iid"]), tokenizer)
    assert all(len(set(c.labels.tolist())) == 3 for c in iid.clients)
    whole = prepare_data(load_config(None, base + ["federation.partition=key"]), tokenizer)
    owners = [set(c.labels.tolist()) for c in whole.clients]
    assert all(len(o) == 1 for o in owners) and set().union(*owners) == {0, 1, 2}


def test_partition_key_puts_every_key_whole_on_one_client_with_balanced_sizes():
    from fedlora.data import partition_indices
    from fedlora.errors import UserError

    rng = np.random.default_rng(3)
    keys = np.repeat(np.arange(9), [40, 5, 7, 12, 30, 3, 8, 20, 15])
    keys = keys[rng.permutation(len(keys))]
    parts = partition_indices(keys, 3, "key", seed=1)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(keys)))  # disjoint and complete
    owners = [{int(k) for k in keys[p]} for p in parts]
    assert sum(len(o) for o in owners) == 9 and len(set().union(*owners)) == 9  # no key on two clients
    sizes = sorted(len(p) for p in parts)
    assert sizes[-1] - sizes[0] <= 40  # largest-first greedy: within the largest key of each other
    assert [p.tolist() for p in partition_indices(keys, 3, "key", seed=1)] == [p.tolist() for p in parts]
    with pytest.raises(UserError, match="one key per client"):
        partition_indices(keys, 10, "key", seed=1)


def test_quantity_skew_draws_unequal_sizes_of_iid_content():
    from fedlora.data import partition_indices

    labels = np.repeat([0, 1], 300)
    parts = partition_indices(labels, 4, "quantity", alpha=0.5, seed=2, min_size=5)
    assert sorted(np.concatenate(parts).tolist()) == list(range(600)) and min(len(p) for p in parts) >= 5
    assert [p.tolist() for p in partition_indices(labels, 4, "quantity", alpha=0.5, seed=2, min_size=5)] == [
        p.tolist() for p in parts]

    def spread(alpha):  # mean coefficient of variation of the client sizes over seeds
        return np.mean([np.std(s := [len(p) for p in partition_indices(labels, 4, "quantity", alpha=alpha, seed=k)])
                        / np.mean(s) for k in range(20)])

    assert spread(0.3) > 3 * spread(100.0)
    big = max(parts, key=len)  # content is iid: the label mix of a large client is near the global half-half
    assert abs(labels[big].mean() - 0.5) < 0.15


def test_key_partitions_need_trl_records_and_free_form_data_needs_a_key(tmp_path):
    from fedlora.errors import UserError
    from fedlora.tasks.causal_lm import CausalLM

    classic = tmp_path / "pr.jsonl"
    classic.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n")
    cfg = load_config(None, ["task=causal-lm", "data.name=jsonl", f"data.path={classic}",
                             "data.partition_column=source", "federation.partition=iid"])
    with pytest.raises(UserError, match="partition_column applies to"):
        CausalLM()._split(cfg)
    cfg = load_config(None, ["task=causal-lm", "federation.partition=dirichlet"])
    with pytest.raises(UserError, match="set data.partition_column"):
        CausalLM()._partition(cfg, np.zeros(10, np.int64), ["any"], "records have no partition key")
    cfg = load_config(None, ["task=causal-lm", "federation.partition=quantity", "federation.num_clients=3"])
    train, test, parts = CausalLM()._partition(cfg, np.zeros(40, np.int64), ["any"], "no key")
    assert sum(len(p) for p in parts) == len(train) and len(train) + len(test) == 40


@pytest.mark.slow
def test_a_deployment_node_file_in_a_trl_format_is_read_and_masked_alike(tmp_path, tokenizer):
    """A node's own data file (flower deployment, `data-path`): same records and masks as the federation's;
    keys the federation does not know get label -1, never a real key."""
    from fedlora.tasks.chat_encoding import encode_records

    path = _keyed(tmp_path, n_per_key=2, keys=("code", "news"))
    cfg = load_config(None, ["task=causal-lm", "data.name=jsonl", f"data.path={path}", "data.partition_column=source"])
    enc = CausalLM().file_data(cfg, path, tokenizer, ["chat", "code", "math"])
    assert enc.labels.tolist() == [1, 1, -1, -1]
    ref, _ = encode_records(tokenizer, to_records(read_rows("jsonl", path)[0], "messages", cfg.data), 64)
    assert all((a == b).all() for a, b in zip(enc.loss_mask, ref.loss_mask)) and len(enc) == len(ref) == 4
