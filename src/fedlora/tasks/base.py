"""The interface every task implements (what is learned: data, model class, head, loss, score, export).
Annotations name the project's types as strings only: tasks sit above the config, the encodings and the models,
and import them where they use them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


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

    def eval_protocol(self, cfg: "ExperimentConfig", shots: int = 0) -> dict[str, Any]:
        """How the held-out score is computed (scorer, shots, template), stated in every metrics row and summary."""
        return {"scorer": "accuracy (argmax of the head)", "shots": 0, "template": "none: the text as it is"}

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
