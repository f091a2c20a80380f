"""Where tensors go: a model's device, and a batch moved there."""

from __future__ import annotations


def model_device(model):
    """Where a model's parameters are (batches go there)."""
    return next(model.parameters()).device


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}
