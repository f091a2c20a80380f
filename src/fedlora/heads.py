"""What a sequence classifier's head reads, for any encoder: fedlora's own mean-pooling head, or the model's own.

model.pooling = "mean" (the default): `MeanPooledClassifier`, the attention-masked mean of the encoder's last
hidden states and one Linear layer. It reads no pooler and no special token, so every encoder (BERT, RoBERTa,
DistilBERT, ELECTRA, DeBERTa, MPNet, ...) and decoder classifies the same way. model.pooling = "cls": the
model's own head as transformers builds it (BERT: tanh(dense(h_CLS)) then a Linear; RoBERTa: dense, tanh,
out_proj on h_CLS; DistilBERT: pre_classifier, ReLU, classifier; a decoder: its last token's score).

Either way the head is every top-level module outside the encoder that has parameters (`head_module_names`):
those are trained, sent, aggregated, checkpointed and exported, one layer or several.
"""

from __future__ import annotations

import inspect

import torch

from fedlora.errors import UserError


def masked_mean(hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where `mask` is 1 (an all-padding row gives 0, not NaN)."""
    mask = mask.to(hidden_states.dtype).unsqueeze(-1)
    return (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def encoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer body of a transformers task model (`bert`, `roberta`, `model`, ...), or the model itself."""
    return getattr(model, "base_model", model)


def head_module_names(model: torch.nn.Module) -> list[str]:
    """The classifier head: every top-level module with parameters outside the encoder, in model order
    (BERT and the mean head: `classifier`; RoBERTa, ELECTRA, MPNet: `classifier` with dense + out_proj inside;
    DistilBERT: `pre_classifier`, `classifier`; DeBERTa-v2: `pooler`, `classifier`; Llama: `score`)."""
    body = encoder_of(model)
    return [name for name, child in model.named_children()
            if child is not body and any(True for _ in child.parameters())]


class MeanPooledClassifier(torch.nn.Module):
    """Encoder → attention-masked mean of the last hidden states → `classifier` (one Linear).

    The encoder keeps the attribute name its task model gave it (`base_model_prefix`: `bert`, `roberta`, ...),
    so LoRA module names, checkpoints and the wire are the same as on the transformers model; its pooler, whose
    output is never read, is replaced by a parameter-free identity. No dropout: fedlora trains in eval mode.
    """

    def __init__(self, encoder: torch.nn.Module, prefix: str, classifier: torch.nn.Linear, config) -> None:
        super().__init__()
        self.base_model_prefix = prefix  # as on a transformers model (PEFT's MoE and tied-weight code read it)
        self.config = config  # PEFT and the trainer read num_labels, model_type, return-dict settings from it
        self.name_or_path = getattr(encoder, "name_or_path", None)  # what PEFT records as the adapter's base
        setattr(self, prefix, encoder)
        self.classifier = classifier
        # No key/value cache while training in eval mode: it is never read, and RWKV updates its state in place
        # (which breaks the backward pass) when it keeps one.
        self._no_cache = {"use_cache": False} if "use_cache" in inspect.signature(encoder.forward).parameters else {}

    @property
    def base_model(self) -> torch.nn.Module:
        return getattr(self, self.base_model_prefix)

    # What PEFT and `models.place` ask a transformers model (PEFT assumes gradient checkpointing when a model
    # does not say, and would then make the embeddings' outputs require grad).
    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(getattr(self.base_model, "is_gradient_checkpointing", False))

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.base_model.gradient_checkpointing_enable(**kwargs)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.base_model.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None, token_type_ids=None,
                **_ignored):
        from transformers.modeling_outputs import SequenceClassifierOutput

        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "inputs_embeds": inputs_embeds,
                  "token_type_ids": token_type_ids}
        hidden = self.base_model(**{k: v for k, v in inputs.items() if v is not None}, **self._no_cache)[0]
        pooled = hidden.mean(dim=1) if attention_mask is None else masked_mean(hidden, attention_mask)
        logits = self.classifier(pooled)
        loss = None
        if labels is not None:  # the task model's own single-label loss: cross-entropy, a mean over the batch
            loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)


def mean_pooled(model: torch.nn.Module, name: str, num_labels: int, seed: int) -> MeanPooledClassifier:
    """fedlora's mean-pooling head on a transformers model: a sequence-classification model (its encoder is
    kept) or a bare model (AutoModel, for an architecture transformers has no classification model for).

    Where the model's own `classifier` already is one Linear from the hidden size to the labels (BERT, ALBERT,
    DistilBERT's last layer) it is kept, initialised as transformers did from `seed` (so the default run on the
    embedded BERT is what it always was); otherwise a new Linear, N(0, initializer_range) weights and zero bias
    drawn from `seed`."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise UserError(f"model.pooling=mean reads an encoder's last hidden states; {name!r} "
                        f"(model_type {config.model_type!r}) is an encoder-decoder model: use model.pooling=cls "
                        f"(its own classification head)")
    prefix = getattr(model, "base_model_prefix", "") or "encoder"
    encoder = encoder_of(model)
    hidden = int(config.hidden_size)
    own = getattr(model, "classifier", None)
    if isinstance(own, torch.nn.Linear) and (own.in_features, own.out_features) == (hidden, num_labels):
        classifier = own
    else:
        classifier = torch.nn.Linear(hidden, num_labels, dtype=encoder.get_input_embeddings().weight.dtype)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            classifier.weight.normal_(0.0, float(getattr(config, "initializer_range", 0.02)), generator=generator)
            classifier.bias.zero_()
    if isinstance(getattr(encoder, "pooler", None), torch.nn.Module):
        encoder.pooler = torch.nn.Identity()
    config.num_labels = num_labels
    return MeanPooledClassifier(encoder, prefix, classifier, config)
