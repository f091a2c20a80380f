"""Sequence classification: labelled texts, a classifier head trained and averaged beside LoRA, accuracy.

Labels drive the held-out split (stratified) and the non-IID partitions (Dirichlet, label skew, fractions).
The head reads the attention-masked mean of the last hidden states by default (`model.pooling`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedlora.devices import model_device, to_device
from fedlora.encoding import EncodedData, collate, encode
from fedlora.tasks.base import Task


class SequenceClassification(Task):
    name = "classification"

    def _split(self, cfg):
        """(dataset, load report, train split, held-out split, per-client train indices): the one place that
        decides which examples are held out (fixed, stratified by label) and which client gets which."""
        from fedlora.data import load_text_dataset, partition_indices, stratified_split

        d, fed = cfg.data, cfg.federation
        ds, report = load_text_dataset(d.name, path=d.path, text_column=d.text_column, label_column=d.label_column)
        train, test = stratified_split(ds, d.test_fraction, seed=cfg.seed)
        parts = partition_indices(train.labels, fed.num_clients, fed.partition, alpha=fed.alpha, seed=cfg.seed,
                                  label_fractions=fed.label_fractions)
        return ds, report, train, test, parts

    def prepare_data(self, cfg, tokenizer):
        from fedlora.data import partition_stats
        from fedlora.encoding import FederatedData

        d = cfg.data
        ds, report, train, test, parts = self._split(cfg)
        if d.max_eval_examples is not None and len(test) > d.max_eval_examples:
            keep = np.random.default_rng(cfg.seed).choice(len(test), d.max_eval_examples, replace=False)
            test = test.subset(np.sort(keep))
        train_enc = encode(tokenizer, train.texts, train.labels, d.max_length)
        return FederatedData(
            clients=[train_enc.subset(p) for p in parts],
            test=encode(tokenizer, test.texts, test.labels, d.max_length),
            label_names=list(ds.label_names),
            partition_stats=partition_stats(train.labels, parts),
            load_summary=report.summary(),
        )

    def client_data(self, cfg, tokenizer, client_id):
        from fedlora.errors import UserError

        if not 0 <= client_id < cfg.federation.num_clients:
            raise UserError(f"partition-id {client_id} outside 0..{cfg.federation.num_clients - 1}")
        ds, _, train, _, parts = self._split(cfg)
        idx = np.asarray(parts[client_id])
        data = encode(tokenizer, [train.texts[i] for i in idx], train.labels[idx], cfg.data.max_length)
        return data, list(ds.label_names)

    def file_data(self, cfg, path, tokenizer, label_names):
        from pathlib import Path

        from fedlora.data import load_text_dataset
        from fedlora.errors import UserError

        kind = "jsonl" if Path(path).suffix.lower() in (".jsonl", ".json") else "csv"
        ds, _ = load_text_dataset(kind, path=path, text_column=cfg.data.text_column, label_column=cfg.data.label_column)
        index = {name: i for i, name in enumerate(label_names)}
        unknown = sorted(set(ds.label_names) - set(index))
        if unknown:
            raise UserError(f"{path}: labels {unknown[:3]} are not among the federation's labels {label_names}")
        mapping = np.array([index[n] for n in ds.label_names])
        return encode(tokenizer, ds.texts, mapping[np.asarray(ds.labels)], cfg.data.max_length)

    def collate(self, data, idx, pad_id):

        return collate(data, idx, pad_id)

    def loss(self, module, batch):
        return module(**batch).loss  # the model's own single-label cross-entropy (a mean over the batch)

    def loss_per_example(self, module, batch):
        """Cross-entropy per example; their mean is the model's own loss (`loss`)."""
        import torch

        logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()
        return torch.nn.functional.cross_entropy(logits, batch["labels"].to(logits.device), reduction="none")

    def evaluate(self, model, data, batch_size, pad_id):
        return evaluate_classifier(model, data, batch_size, pad_id)

    def base_model(self, cfg, num_outputs):
        from fedlora.models import load_base_model

        return load_base_model(cfg.model.name, num_outputs, cfg.seed, cfg.model.pooling)

    def lora_options(self, cfg, base) -> dict[str, Any]:
        # Every module of the head (one Linear, or RoBERTa's dense + out_proj, DistilBERT's pre_classifier +
        # classifier) gets a trainable copy in modules_to_save. PEFT's SEQ_CLS task always adds `classifier` and
        # `score` to it, whatever is passed; a frozen head therefore needs the plain PeftModel, whose forward
        # calls the base model as is.
        from fedlora.heads import head_module_names

        return {"modules_to_save": head_module_names(base) if cfg.lora.train_head else None,
                "task_type": "SEQ_CLS" if cfg.lora.train_head else None}

    def export_meta(self, cfg, label_names) -> dict[str, Any]:
        return {"task": self.name, "model": cfg.model.name, "pooling": cfg.model.pooling, "seed": cfg.seed,
                "num_labels": len(label_names), "label_names": label_names}

    def load_exported(self, meta):
        from fedlora.models import load_base_model

        # The seed rebuilds the head's init, which is the head itself when lora.train_head=false (not exported).
        return load_base_model(meta["model"], meta["num_labels"], seed=meta.get("seed", 0),
                               pooling=meta.get("pooling", "cls"))


@torch.inference_mode()
def evaluate_classifier(model: torch.nn.Module, data: EncodedData, batch_size: int, pad_id: int) -> tuple[float, float]:
    """Mean loss and accuracy of a classifier on `data` (sorted by length so batches pad little)."""
    order = np.argsort([len(x) for x in data.input_ids], kind="stable")
    total_loss, correct = 0.0, 0
    device = model_device(model)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        batch = to_device(collate(data, idx, pad_id), device)
        out = model(**batch)
        total_loss += float(out.loss) * len(idx)
        correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
    n = max(len(order), 1)
    return total_loss / n, correct / n
