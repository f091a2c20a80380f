"""A messages file, a prompt-completion file and a text file each train one tiny federated round of the
embedded SmolLM2 (task=causal-lm), their load summaries naming the format and the records dropped."""

from __future__ import annotations

import json

import numpy as np
import pytest

import fedlora

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["task=causal-lm", "data.name=jsonl", "data.max_length=64", "data.test_fraction=0.25",
        "federation.num_clients=2", "federation.rounds=1", "federation.local_steps=1", "federation.batch_size=2",
        "federation.partition=iid", "optim.lr=2e-3", "eval.batch_size=4", "eval.max_new_tokens=2",
        "output.progress=false", "output.save_adapter=false"]


def _records(fmt: str) -> list[dict]:
    rows = []
    for a in range(12):
        q, r = f"What is {a} plus {a}?", str(2 * a)
        if fmt == "messages":
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": r},
                                      {"role": "user", "content": "Double it."},
                                      {"role": "assistant", "content": str(4 * a)}]})
        elif fmt == "prompt-completion":
            rows.append({"prompt": q, "completion": r, "system": "Answer with a number."})
        else:
            rows.append({"text": f"{a} plus {a} is {2 * a}."})
    bad = {"messages": {"messages": [{"role": "user", "content": "no answer"}]},
           "prompt-completion": {"prompt": "no answer", "completion": ""}, "text": {"text": " "}}[fmt]
    return rows + [bad]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["messages", "prompt-completion", "text"])
def test_each_trl_format_trains_a_round(tmp_path, fmt):
    path = tmp_path / f"{fmt}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records(fmt)))
    result = fedlora.run(None, overrides=TINY + [f"data.path={path}"], out=tmp_path / "run")
    s = result.summary
    # 13 rows, the bad one dropped: 3 held out, 9 trained on by two clients.
    assert s["test_examples"] == 3 and sum(p["size"] for p in s["partition"]) == 9, s
    row = result.metrics[-1]
    assert np.isfinite(row["train_loss"]) and min(row["update_norms"].values()) > 0
    # One step on the masked tokens already lowers the held-out loss on those tokens.
    assert s["final_eval_loss"] < s["eval_loss_before"], s
    from fedlora.config import load_config
    from fedlora.tasks.causal_lm import CausalLM

    records = CausalLM()._trl_records(load_config(result.run_dir / "config.toml"))
    assert records.fmt == fmt and sum(records.bad.values()) == 1
    assert records.summary().startswith(f"{fmt} records: 13 read, 12 kept; dropped: ")
