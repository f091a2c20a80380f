"""Tasks: everything that depends on what is being learned, behind one interface, one registry.

A task decides how examples are loaded, split and partitioned over clients, how they are tokenized and
batched, which model class carries the LoRA adapters (and which head, if any, is trained beside them), how a
model is scored, and what an exported adapter needs to be rebuilt. The round loop, the strategies, privacy and
the engines never look inside: adding a task (for example causal language modelling) is one new file here
and one registry line. `cfg.task` picks it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and transformers load only when a task runs
    import numpy as np
    import torch

    from fedlora.client import EncodedData
    from fedlora.config import ExperimentConfig
    from fedlora.experiment import FederatedData


class Task(ABC):
    """What a run learns. Each method gets the run's config; `label_names` are the task's output names
    (the classes of a classifier; empty for tasks without labels)."""

    name: str = ""

    @abstractmethod
    def prepare_data(self, cfg: "ExperimentConfig", tokenizer) -> "FederatedData":
        """Load, split off a fixed held-out set no client trains on, partition over clients, tokenize."""

    @abstractmethod
    def client_data(self, cfg: "ExperimentConfig", tokenizer, client_id: int) -> tuple["EncodedData", list[str]]:
        """One client's share, exactly as `prepare_data` partitions it, tokenizing only that share (a node)."""

    @abstractmethod
    def file_data(self, cfg: "ExperimentConfig", path: str, tokenizer, label_names: list[str]) -> "EncodedData":
        """A node's own data file, mapped onto the federation's outputs."""

    @abstractmethod
    def collate(self, data: "EncodedData", idx: "np.ndarray", pad_id: int) -> dict[str, "torch.Tensor"]:
        """The model inputs (with the training target) of the examples `idx`."""

    def loss(self, module: "torch.nn.Module", batch: dict[str, "torch.Tensor"]) -> "torch.Tensor":
        """The training loss of a batch: a mean over examples (DP-SGD clips per example and expects a mean)."""
        return self.loss_per_example(module, batch).mean()

    @abstractmethod
    def loss_per_example(self, module: "torch.nn.Module", batch: dict[str, "torch.Tensor"]) -> "torch.Tensor":
        """Each example's training loss (N,): `loss` is their mean; batched clients take each client's own mean."""

    @abstractmethod
    def evaluate(self, model: "torch.nn.Module", data: "EncodedData", batch_size: int, pad_id: int) -> tuple[float, float]:
        """(mean loss, score) of the active model on `data`; the score is what metrics call `eval_accuracy`."""

    @abstractmethod
    def base_model(self, cfg: "ExperimentConfig", num_outputs: int) -> "torch.nn.Module":
        """The frozen base model, any new head (`num_outputs` wide) initialised from `cfg.seed`, so every process
        builds the same."""

    @abstractmethod
    def lora_options(self, cfg: "ExperimentConfig", base: "torch.nn.Module") -> dict[str, Any]:
        """PEFT LoraConfig arguments of this task (task type, modules trained and sent beside LoRA), for the
        `base_model` it built (before PEFT wraps it)."""

    @abstractmethod
    def export_meta(self, cfg: "ExperimentConfig", label_names: list[str]) -> dict[str, Any]:
        """What `load_exported` needs to rebuild the base model of an exported adapter (fedlora.json)."""

    @abstractmethod
    def load_exported(self, meta: dict[str, Any]) -> "torch.nn.Module":
        """The base model an exported adapter was trained on, from its `export_meta`."""


def model_device(model) -> "torch.device":
    """Where a model's parameters are (batches go there)."""
    return next(model.parameters()).device


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


_TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    if cls.name in _TASKS:
        raise ValueError(f"task name {cls.name!r} is already registered by {_TASKS[cls.name].__qualname__}")
    _TASKS[cls.name] = cls
    return cls


def available_tasks() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str) -> Task:
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(available_tasks())}")
    return _TASKS[name]()


from . import causal_lm, classification  # noqa: E402,F401  (registers the built-in tasks)
