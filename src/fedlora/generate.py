"""`fedlora generate`: the answer of a causal-LM run's exported global model to a prompt."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedlora.errors import UserError
from fedlora.host import load_exported_model, load_tokenizer
from fedlora.tasks.causal_lm import CausalLM, prompt_ids


def generate_from_run(run_dir, prompt: str, max_new_tokens: int | None = None) -> str:
    """The answer of a causal-lm run's exported global model to `prompt` (greedy), as the run scored it."""

    adapter = Path(run_dir) / "adapter"
    meta_file = adapter / "fedlora.json"
    if not meta_file.is_file():
        raise UserError(f"no exported adapter in {run_dir} (adapter/fedlora.json): was output.save_adapter off?")
    meta = json.loads(meta_file.read_text())
    if meta.get("task") != CausalLM.name:
        raise UserError(f"{run_dir} is a {meta.get('task', 'classification')} run: generate needs task=causal-lm")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise UserError("--max-new-tokens must be >= 1")
    tokenizer = load_tokenizer(meta["model"])
    task = CausalLM()
    task.tokenizer = tokenizer
    model = load_exported_model(adapter)
    ids = np.asarray(prompt_ids(tokenizer, prompt, meta.get("system_prompt")), dtype=np.int64)
    return task.generate(model, [ids], tokenizer.pad_token_id or 0, max_new_tokens or meta.get("max_new_tokens", 32))[0]
