"""`fedlora eval RUN_DIR` on a run's exported adapter (the embedded SmolLM2 at tiny size): the run's last logged
score and loss come back, the report states the protocol; multiple-choice log-likelihoods against a reference
computed one sequence at a time, unpadded."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import fedlora
from fedlora.config import load_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_eval_reproduces_the_runs_last_logged_score(tmp_path, capsys, monkeypatch):
    from tiny_models import write_csv

    from fedlora.cli import main

    data = write_csv(tmp_path / "reviews.csv", n=24, prompt_response=True)
    result = fedlora.run(None, out=tmp_path / "run", overrides=[
        "task=causal-lm", "data.name=csv", f"data.path={data}", "data.test_fraction=0.25", "data.max_length=48",
        "data.system_prompt=Answer positive or negative.", "federation.num_clients=1", "federation.rounds=1",
        "federation.local_steps=1", "federation.batch_size=4", "federation.partition=iid", "optim.lr=2e-3",
        "eval.batch_size=6", "eval.max_new_tokens=2", "output.progress=false"])
    row = result.metrics[-1]
    assert main(["eval", str(result.run_dir)]) == 0
    line = capsys.readouterr().out
    assert "label-match" in line and "6 examples of the run's held-out split" in line and "0 shots" in line
    report = json.loads((result.run_dir / "eval" / "held-out-label-match-0shot.json").read_text())
    # The exported adapter, loaded as a user loads it, scores the held-out split as the run's last round did.
    assert report["score"] == row["eval_accuracy"] and report["examples"] == 6
    assert report["loss"] == pytest.approx(row["eval_loss"], rel=1e-5, abs=1e-6)
    assert report["eval_protocol"] == row["eval_protocol"]
    assert len(report["outputs"]) == len(report["answers"]) == len(report["points"]) == 6
    assert np.mean(report["points"]) == report["score"]
    # `fedlora report` states how each run was scored.
    from fedlora.report import compare_runs

    md = compare_runs([result.run_dir], tmp_path / "report").read_text()
    assert f"- run: scored by label-match, 0 shots, template {row['eval_protocol']['template']}" in md
    assert main(["eval", str(tmp_path)]) == 2  # not a run folder: one line
    assert "not a run folder" in capsys.readouterr().err
    _lm_eval_task_of_the_held_out_split(result.run_dir, report, capsys, monkeypatch)


def _lm_eval_task_of_the_held_out_split(run_dir, report, capsys, monkeypatch):
    """--lm-eval held-out: the task YAML and JSON data lm-evaluation-harness would read, offline; the prompts
    are the very tokens fedlora scored. Without the lm_eval extra: one line, exit 2."""
    import sys

    import yaml

    from fedlora.cli import main
    from fedlora.host import load_tokenizer
    from fedlora.lm_eval_run import MISSING, held_out_task
    from fedlora.tasks.causal_lm import CausalLM

    path = held_out_task(run_dir, None, "multiple-choice")
    task = yaml.safe_load(path.read_text())
    data_file = run_dir / "eval" / "lm-eval" / "fedlora_held_out.jsonl"
    assert task["task"] == "fedlora_held_out" and task["dataset_path"] == "json"
    assert task["dataset_kwargs"] == {"data_files": {"test": str(data_file)}} and task["test_split"] == "test"
    assert task["output_type"] == "multiple_choice" and task["target_delimiter"] == ""
    assert (task["doc_to_text"], task["doc_to_choice"], task["doc_to_target"]) == ("text", "choices", "gold")
    assert [m["metric"] for m in task["metric_list"]] == ["acc", "acc_norm"]
    rows = [json.loads(line) for line in data_file.read_text().splitlines()]
    assert [r["answer"] for r in rows] == report["answers"]
    assert all(r["choices"] == ["negative", "positive"] and r["choices"][r["gold"]] == r["answer"] for r in rows)
    cfg = load_config(run_dir / "config.toml")
    tok = load_tokenizer(cfg.model.name)
    held = CausalLM().held_out(cfg, tok)
    for r, ids, n in zip(rows, held.input_ids, held.prompt_len):  # the text re-tokenizes to fedlora's prompt
        assert tok(r["text"], add_special_tokens=False)["input_ids"] == list(ids[:n])
    generated = yaml.safe_load(held_out_task(run_dir, None, "exact-match").read_text())
    assert generated["output_type"] == "generate_until" and generated["doc_to_target"] == "answer"
    kwargs = generated["generation_kwargs"]
    assert kwargs["max_gen_toks"] == 2 and "<|im_end|>" in kwargs["until"] and kwargs["do_sample"] is False
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # not installed: refused in one line
    assert main(["eval", str(run_dir), "--lm-eval", "held-out"]) == 2
    assert capsys.readouterr().err.strip() == f"fedlora: error: {MISSING}"


def test_shots_are_turns_before_the_prompt():
    """--shots k: k (prompt, answer) demonstrations as user and assistant turns before the prompt (chat template),
    or prompt, newline, answer, blank line (plain); the length budget grows by the demonstrations only."""
    from fedlora.host import load_tokenizer
    from fedlora.tasks.causal_lm import CausalLM, prompt_ids

    tok = load_tokenizer("embedded:SmolLM2-135M-Instruct")
    demos = (("Is 'great fun' positive or negative?", "positive"), ("Is 'a bore' positive or negative?", "negative"))
    text = tok.decode(prompt_ids(tok, "Is 'lovely' positive or negative?", "One word.", demos))
    turns = ["<|im_start|>system\nOne word.<|im_end|>", "<|im_start|>user\nIs 'great fun' positive or negative?",
             "<|im_start|>assistant\npositive<|im_end|>", "<|im_start|>user\nIs 'a bore'",
             "<|im_start|>assistant\nnegative<|im_end|>", "<|im_start|>user\nIs 'lovely'", "<|im_start|>assistant\n"]
    at = 0
    for t in turns:  # each turn, in this order (str.index raises when one is missing)
        at = text.index(t, at) + len(t)
    assert at == len(text)
    cfg = load_config(None, ["task=causal-lm", "data.max_length=24", "data.system_prompt=One word."])
    long_prompt = "word " * 100
    zero = CausalLM().encode(cfg, tok, [long_prompt], ["positive"], np.zeros(1, dtype=np.int64))
    two = CausalLM().encode(cfg, tok, [long_prompt], ["positive"], np.zeros(1, dtype=np.int64), shots=demos)
    extra = len(prompt_ids(tok, "", "One word.", demos)) - len(prompt_ids(tok, "", "One word."))
    assert len(zero.input_ids[0]) == 24 and len(two.input_ids[0]) == 24 + extra  # the prompt cut the same way
    system = len(tok("<|im_start|>system\nOne word.<|im_end|>\n", add_special_tokens=False)["input_ids"])
    assert list(two.input_ids[0][system + extra:]) == list(zero.input_ids[0][system:])  # the same user turn


def test_option_log_likelihoods_match_an_unpadded_reference(tmp_path):
    """choice_scoring batches options with left padding and reads only the last logits; each option's summed
    log-probability must equal one full forward pass of prompt + option alone."""
    from tiny_models import minilm_tokenizer, save_tiny_model
    from transformers import AutoModelForCausalLM

    from fedlora.tasks.choice_scoring import option_logprobs

    folder = save_tiny_model(tmp_path / "llama", "llama", minilm_tokenizer(), causal=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1000, 2000, size=n) for n in (3, 7, 5)]
    options = [[rng.integers(1000, 2000, size=k) for k in sizes] for sizes in ((1, 3), (2, 2, 4), (5, 1))]
    got = option_logprobs(model, prompts, options, pad_id=0, batch_size=3)
    for p, opts, lp in zip(prompts, options, got):
        for o, value in zip(opts, lp):
            seq = torch.from_numpy(np.concatenate([p, o]))[None]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=seq).logits[0, :-1], dim=-1)
            ref = logp[np.arange(len(p) - 1, len(seq[0]) - 1), seq[0, len(p):]].sum().item()
            assert value == pytest.approx(ref, abs=1e-9)


def test_multiple_choice_scores_the_options_it_is_given(tmp_path):
    """A task file with a `choices` column: each example is scored on its own options (the reference among
    them), and a reference that is not among them is refused in one line."""
    from fedlora.errors import UserError
    from fedlora.eval_run import choice_rows

    cfg = load_config(None, ["task=causal-lm"])
    good = tmp_path / "mc.jsonl"
    good.write_text(json.dumps({"prompt": "2+2?", "completion": "4", "choices": ["3", "4"]}) + "\n"
                    + json.dumps({"prompt": "Capital of France?", "completion": "Paris",
                                  "choices": ["Paris", "Rome", "Oslo"]}) + "\n")
    prompts, answers, choices = choice_rows(cfg, str(good))
    assert prompts == ["2+2?", "Capital of France?"] and answers == ["4", "Paris"]
    assert choices == [["3", "4"], ["Paris", "Rome", "Oslo"]]
    bad = tmp_path / "bad.csv"
    bad.write_text('prompt,completion,choices\nq,a,"[""only""]"\n')
    with pytest.raises(UserError, match="record 1: needs a prompt, an answer and a `choices` list of 2"):
        choice_rows(cfg, str(bad))
