"""fedlora's generated instruction benchmark (`data.name = "instruct-bench"`): the same rows on every call and
Python version (the committed sample pins them), every answer right by an independent reading of its prompt,
and configs/instruct-bench.toml trains a round end to end with one task family per client."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fedlora.data.instruct_bench import PER_TASK, TASKS, generate, main

ROOT = Path(__file__).resolve().parents[1]


def test_generator_is_deterministic_and_matches_the_committed_sample(tmp_path):
    rows = generate()
    assert rows == generate()
    assert Counter(r["task"] for r in rows) == {t: PER_TASK for t in TASKS}
    assert len({r["prompt"] for r in rows}) == len(rows)
    sample = [json.loads(line) for line in (ROOT / "docs" / "instruct-bench-sample.jsonl").read_text().splitlines()]
    assert sample == [r for t in TASKS for r in [x for x in rows if x["task"] == t][:5]]
    assert generate(seed=1) != rows
    # One family's size does not move another's rows.
    assert [r for r in generate(per_task=50) if r["task"] == "reverse"] == \
        [r for r in rows if r["task"] == "reverse"][:50]
    assert main([str(tmp_path / "b.jsonl"), "--per-task", "3"]) == 0
    assert [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()] == generate(per_task=3)


def _expected(row: dict) -> str:
    """The answer read back from the prompt alone, by rules written apart from the generator's."""
    body = row["prompt"].split("\n\n", 1)[1]
    if row["task"] == "largest":
        return str(max(int(x) for x in re.findall(r"\d+", body)))
    if row["task"] == "reverse":
        return ", ".join(body.removeprefix("Words: ").split(", ")[::-1])
    if row["task"] == "arithmetic":
        n = [int(x) for x in re.findall(r"\d+", body)]
        if "gets" in body:
            return str(n[0] + n[1])
        if "gave" in body:
            return str(n[0] - n[1])
        if "boxes" in body:
            return str(n[0] * n[1])
        return str(n[0] + n[1] - n[2])
    sentence = body.removeprefix("Sentence: ")
    ask = row["prompt"].split(" from the sentence")[0]
    if ask.endswith("age"):
        return re.search(r"\d+", sentence).group()
    if ask.endswith("city"):
        return re.search(r"(?:In|in|to) ([A-Z]\w+)", sentence).group(1)
    if ask.endswith("job"):
        return re.search(r"(?:as a|-old|The) ([a-z]+)", sentence).group(1)
    return re.search(r"([A-Z][a-z]+ [A-Z][a-z]+)", sentence.replace("In ", "in ").replace("The ", "the ")).group(1)


def test_every_answer_is_right_and_exact():
    for row in generate():
        assert row["completion"] == _expected(row), row
    arithmetic = [int(r["completion"]) for r in generate() if r["task"] == "arithmetic"]
    assert min(arithmetic) >= 1 and max(arithmetic) <= 81


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_config_trains_a_round_with_one_family_per_client(tmp_path):
    import fedlora

    tiny = ["federation.rounds=1", "federation.local_steps=1", "federation.batch_size=2", "data.max_length=64",
            "data.max_eval_examples=8", "eval.max_new_tokens=2", "output.progress=false", "output.save_adapter=false"]
    result = fedlora.run(ROOT / "configs" / "instruct-bench.toml", overrides=tiny, out=tmp_path / "run")
    s = result.summary
    assert s["test_examples"] == 8 and sum(p["size"] for p in s["partition"]) == 1700, s
    # partition=key on the task column: every client holds exactly one whole family.
    counts = sorted(p["label_counts"] for p in s["partition"])
    assert counts == [[0, 0, 0, 425], [0, 0, 425, 0], [0, 425, 0, 0], [425, 0, 0, 0]], s["partition"]
    row = result.metrics[-1]
    assert np.isfinite(row["train_loss"]) and min(row["update_norms"].values()) > 0
    assert s["final_eval_loss"] < s["eval_loss_before"], s
