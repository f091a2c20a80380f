"""model.pooling: fedlora's head on the masked mean the embedded sentence-transformer was trained with, or the
model's own head (for BERT: its pooler)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlora.config import EMBEDDED_MODEL
from fedlora.heads import MeanPooledClassifier, masked_mean
from fedlora.models import load_base_model, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SENTENCES = ["a gripping, beautifully acted film .", "dull .", "the plot wanders for two hours and never arrives anywhere ."]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(EMBEDDED_MODEL)


@pytest.fixture(scope="module")
def mean_model():
    return load_base_model(EMBEDDED_MODEL, 2, seed=0, pooling="mean")


@pytest.mark.slow  # the real embedded model
def test_mean_head_reads_the_masked_mean_of_the_last_hidden_states(tok, mean_model):
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    assert int((batch["attention_mask"] == 0).sum()) > 0  # the batch really has padding
    assert isinstance(mean_model, MeanPooledClassifier)
    assert not any("pooler" in n for n, _ in mean_model.named_parameters())  # BERT's pooler is never read
    with torch.inference_mode():
        h = mean_model.bert(**batch).last_hidden_state.double()
        logits = mean_model(**batch).logits.double()
    m = batch["attention_mask"].double().unsqueeze(-1)
    w, b = mean_model.classifier.weight.double(), mean_model.classifier.bias.double()
    expected = ((h * m).sum(1) / m.sum(1)) @ w.T + b
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # the real embedded model
def test_padding_never_changes_a_sentence_logits(tok, mean_model):
    """Alone (no padding) and beside a much longer sentence (padded): the same logits. An unmasked mean fails."""
    with torch.inference_mode():
        alone = mean_model(**tok(SENTENCES[1:2], return_tensors="pt")).logits
        padded = mean_model(**tok(SENTENCES[1:], padding=True, return_tensors="pt")).logits[:1]
    torch.testing.assert_close(alone, padded, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # the real embedded model
def test_mean_head_keeps_the_names_and_init_of_bert_classifier(tok, mean_model):
    """Checkpoints, the wire and exported adapters name BERT's head `classifier.*`; its init is transformers'."""
    native = load_base_model(EMBEDDED_MODEL, 2, seed=0, pooling="cls")
    assert {n for n, _ in mean_model.named_parameters()} == {n for n, _ in native.named_parameters()
                                                             if not n.startswith("bert.pooler.")}
    torch.testing.assert_close(mean_model.classifier.weight, native.classifier.weight, rtol=0, atol=0)


@pytest.mark.slow  # the real embedded model
def test_cls_pooling_keeps_the_model_pooler(tok):
    model = load_base_model(EMBEDDED_MODEL, 2, seed=0, pooling="cls")
    assert type(model.bert.pooler).__name__ == "BertPooler"
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.inference_mode():
        out = model.bert(**batch)
        expected = model.bert.pooler.activation(model.bert.pooler.dense(out.last_hidden_state[:, 0]))
    torch.testing.assert_close(out.pooler_output, expected)


def test_mean_head_on_an_encoder_without_a_pooler(tmp_path):
    """DistilBERT has no pooler: the mean head reads its encoder all the same; the native head is two layers."""
    from transformers import DistilBertConfig, DistilBertModel

    from fedlora.heads import head_module_names

    cfg = DistilBertConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=32)
    DistilBertModel(cfg).save_pretrained(tmp_path)
    mean = load_base_model(str(tmp_path), 3, seed=0, pooling="mean")
    assert head_module_names(mean) == ["classifier"] and mean.classifier.out_features == 3
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    with torch.inference_mode():
        out = mean(input_ids=ids, attention_mask=(ids > 0).long(), labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)
    assert head_module_names(load_base_model(str(tmp_path), 3, seed=0, pooling="cls")) == ["pre_classifier",
                                                                                            "classifier"]


def test_empty_mask_row_is_finite():
    out = masked_mean(torch.ones(2, 3, 4), torch.tensor([[1, 1, 0], [0, 0, 0]]))
    assert np.isfinite(out.numpy()).all() and torch.allclose(out[0], torch.ones(4))
