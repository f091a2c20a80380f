"""Tokenized examples and their batches: what a task produces from data and what training and scoring read."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class EncodedData:
    """Token ids per example (unpadded) and labels; batches are padded to their longest example.

    Causal LM: `prompt_len[i]` tokens of example i are the prompt (no loss there), the rest its response;
    `answers[i]` is the response text generation is scored against; `labels` are answer classes (partitions).
    `loss_mask[i]` (optional, bool per token) marks the tokens that carry the loss when they are not one
    contiguous response at the end (multi-turn conversations: every assistant turn; plain texts: every token);
    `prompt_len[i]` is then the prompt generation starts from."""

    input_ids: list[np.ndarray]
    labels: np.ndarray
    prompt_len: np.ndarray | None = None
    answers: list[str] | None = None
    loss_mask: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> "EncodedData":
        idx = np.asarray(idx, dtype=np.int64)
        return EncodedData([self.input_ids[i] for i in idx], self.labels[idx],
                           None if self.prompt_len is None else self.prompt_len[idx],
                           None if self.answers is None else [self.answers[i] for i in idx],
                           None if self.loss_mask is None else [self.loss_mask[i] for i in idx])


def encode(tokenizer, texts: list[str], labels: np.ndarray, max_length: int) -> EncodedData:
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
    return EncodedData([np.asarray(x, dtype=np.int64) for x in enc["input_ids"]], np.asarray(labels, np.int64))


def collate(data: EncodedData, idx: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the batch's longest sequence. Written by hand: it is on the hot path and tokenizer.pad is slower."""
    seqs = [data.input_ids[i] for i in idx]
    width = max((len(s) for s in seqs), default=1)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = s
        mask[row, : len(s)] = 1
    return {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask),
        "labels": torch.from_numpy(data.labels[idx]),
    }


@dataclass
class FederatedData:
    clients: list[EncodedData]
    test: EncodedData
    label_names: list[str]
    partition_stats: list[dict]
    load_summary: str
    # What partition_stats' label_counts count when it is not label_names (partition=clusters | length: groups).
    partition_groups: list[str] | None = None
