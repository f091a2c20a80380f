"""Small random-weight model folders of many architectures, built from transformers configs (no download), with
the embedded MiniLM's tokenizer (BERT WordPiece, 30,522 ids) in every folder, and a small labelled CSV."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

# Sizes every config takes (names transformers maps onto each family's own, e.g. n_embd for GPT-2).
SMALL = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, intermediate_size=32,
             head_dim=8, vocab_size=30522, max_position_embeddings=128, pad_token_id=0)
# What a family needs beyond (or instead of) SMALL to be small and valid.
EXTRA: dict[str, dict] = {
    "electra": dict(embedding_size=16),
    "distilbert": dict(dim=16, n_layers=1, n_heads=2, hidden_dim=32),
    "deberta-v2": dict(pooler_hidden_size=16),
    "deberta": dict(pooler_hidden_size=16),
    "rwkv": dict(num_hidden_layers=2),  # its init divides by layers - 1
    "gpt_neo": dict(attention_types=[[["global"], 1]]),
    "gptj": dict(rotary_dim=4),
    "codegen": dict(rotary_dim=4),
    "falcon": dict(head_dim=None),
    "bart": dict(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                 encoder_ffn_dim=32, decoder_ffn_dim=32),
    "t5": dict(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2),
    "mt5": dict(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2),
}


def minilm_tokenizer():
    from fedlora.architectures import EMBEDDED_MODEL
    from fedlora.models import load_tokenizer

    return load_tokenizer(EMBEDDED_MODEL)


def tiny_config(model_type: str):
    """A small config of `model_type`; raises when transformers cannot build one."""
    from transformers import AutoConfig

    sizes = {**SMALL, **EXTRA.get(model_type, {})}
    return AutoConfig.for_model(model_type, **{k: v for k, v in sizes.items() if v is not None})


MAX_PARAMS = 4_000_000  # the 30,522 x 16 embeddings are 0.49M of it


def tiny_size(model_type: str, causal: bool = False) -> int:
    """Parameters of the small model, counted on the meta device (nothing allocated): multimodal configs keep
    their vision towers at full size, which must never be built here."""
    from transformers import AutoModel, AutoModelForCausalLM

    with torch.device("meta"):
        model = (AutoModelForCausalLM if causal else AutoModel).from_config(tiny_config(model_type))
    return sum(p.numel() for p in model.parameters())


def save_tiny_model(folder: Path, model_type: str, tokenizer, seed: int = 0, causal: bool = False) -> str:
    """A random-weight checkpoint (the bare model, or a causal LM) and the tokenizer in `folder`, as a user's
    own model folder looks; a classification head is then new, as on a pretrained checkpoint."""
    from transformers import AutoModel, AutoModelForCausalLM

    if tiny_size(model_type, causal) > MAX_PARAMS:
        raise ValueError(f"a {model_type} model does not get small from these sizes")
    torch.manual_seed(seed)
    config = tiny_config(model_type)
    model = (AutoModelForCausalLM if causal else AutoModel).from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


WORDS = {0: ["dull", "boring", "flat", "tedious", "weak"], 1: ["great", "moving", "sharp", "lovely", "bold"]}


def write_csv(path: Path, n: int = 48, prompt_response: bool = False) -> str:
    """`n` short labelled sentences, two classes (or prompt/response columns for task=causal-lm)."""
    rows = []
    for i in range(n):
        label = i % 2
        words = [WORDS[label][(i * 7 + j) % 5] for j in range(2 + i % 5)]
        text = f"review {i}: " + " ".join(words)
        rows.append((text, ["negative", "positive"][label]) if prompt_response else (text, label))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "response"] if prompt_response else ["text", "label"])
        writer.writerows(rows)
    return str(path)
