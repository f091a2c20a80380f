"""The model a process trains on: one base model (built by the run's task) with one PEFT LoRA adapter per client
rank, and the way back from an exported adapter. Clients are simulated by swapping the factors of the adapter of
their rank (see engines/local.py), so the base model is loaded once per process whatever the number of clients.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedlora.architectures import default_targets
from fedlora.config import ExperimentConfig
from fedlora.devices import model_device, to_device  # noqa: F401  (re-exported)
from fedlora.errors import UserError
from fedlora.models import (  # noqa: F401  (re-exported: callers that need both import from here)
    DTYPES, load_base_model, load_causal_lm, load_tokenizer, place, quantization_config, resolve_device,
    resolve_model_path,
)
from fedlora.tasks import get_task


def load_exported_model(adapter_dir: str | Path, verify: bool = True) -> torch.nn.Module:
    """The global model of a run folder's `adapter/`: the base as the run built it (pooling too) + the adapter.

    `verify`: refuse (one-line UserError) an adapter whose files differ from its manifest.json, or a base model
    whose files differ from the one it was trained on (fedlora.verify)."""
    import json

    from peft import PeftModel

    from fedlora.verify import check_base, verify_adapter

    if verify:
        manifest = verify_adapter(adapter_dir)
    meta = json.loads((Path(adapter_dir) / "fedlora.json").read_text())
    if verify:
        check_base(manifest, resolve_model_path(meta.get("model", "")))
    base = get_task(meta.get("task", "classification")).load_exported(meta)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def adapter_name(rank: int) -> str:
    return f"r{rank}"


def adapter_options(cfg: ExperimentConfig, base: torch.nn.Module) -> dict:
    """The LoraConfig arguments that depend on the model, not the rank: the target modules (lora.targets, else
    the architecture's defaults, found in `base`'s module tree when its type is not enough), the head trained
    beside LoRA and PEFT's task type. Read from `base` before PEFT wraps it."""
    return {"target_modules": list(cfg.lora.targets or default_targets(cfg.model.name, base)),
            **get_task(cfg.task).lora_options(cfg, base)}


def lora_config(cfg: ExperimentConfig, rank: int, options: dict):
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_dropout=0.0,
        **cfg.lora.peft_scaling(rank),  # lora_alpha, use_rslora: PEFT's scale equals cfg.lora.scale(rank)
        # fresh lists: PEFT's sequence-classification model extends modules_to_save in place
        **{k: list(v) if isinstance(v, list) else v for k, v in options.items()},
    )


class ModelHost:
    """One base model with a LoRA adapter per rank; `activate(rank)` sets what trains for a strategy."""

    def __init__(self, cfg: ExperimentConfig, num_labels: int, ranks: set[int] | list[int],
                 base: torch.nn.Module | None = None, tokenizer=None):
        """`base`, `tokenizer`: a base model and tokenizer built in code instead of the task's `base_model` and
        `model.name`'s tokenizer (the GPU check trains random-weight models built from a config; the trainer
        reads only the tokenizer's pad_token_id)."""
        from peft import get_peft_model

        self.cfg = cfg
        self.task = get_task(cfg.task)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model.name)
        base = place(base if base is not None else self.task.base_model(cfg, num_labels), cfg)
        self.device = model_device(base)
        self.options = adapter_options(cfg, base)
        ranks = sorted(set(ranks))
        try:
            self.model = get_peft_model(base, lora_config(cfg, ranks[-1], self.options),
                                        adapter_name=adapter_name(ranks[-1]))
        except ValueError as exc:
            raise UserError(f"cannot attach LoRA to {cfg.model.name!r}: {exc}") from None
        self.model.eval()
        if cfg.model.dtype == "float64":
            self.model.double()
        self.ranks: set[int] = {ranks[-1]}
        for r in ranks[:-1]:
            self.ensure_rank(r)

    def ensure_rank(self, rank: int) -> str:
        """Add an adapter for `rank` on first use (HetLoRA clients shrink their rank during a run)."""
        name = adapter_name(rank)
        if rank not in self.ranks:
            self.model.add_adapter(name, lora_config(self.cfg, rank, self.options))
            self.ranks.add(rank)
            if self.cfg.model.dtype == "float64":
                self.model.double()  # PEFT makes adapters float32; a float64 model is float64 throughout
        return name

    def activate(self, rank: int, train_A: bool, train_B: bool = True) -> list[torch.nn.Parameter]:
        """Make the rank's adapter active; return the trainable parameters (the factors asked for, the head).
        A parametrized lora_A (Fed-SB's R) counts as A: its parameter lives under `.lora_A.`."""
        name = self.ensure_rank(rank)
        self.model.set_adapter(name)
        trainable = []
        for pname, p in self.model.named_parameters():
            train = f".{name}." in pname and (
                (".lora_B." in pname and train_B) or (".lora_A." in pname and train_A) or ".modules_to_save." in pname
            )
            p.requires_grad_(train)
            if train:
                trainable.append(p)
        return trainable
