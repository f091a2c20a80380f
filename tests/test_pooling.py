"""model.pooling: the masked mean the embedded sentence-transformer was trained with, or the model's own pooler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlora.config import EMBEDDED_MODEL
from fedlora.models import MaskedMeanPooler, load_base_model, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SENTENCES = ["a gripping, beautifully acted film .", "dull .", "the plot wanders for two hours and never arrives anywhere ."]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(EMBEDDED_MODEL)


@pytest.fixture(scope="module")
def mean_model():
    return load_base_model(EMBEDDED_MODEL, 2, seed=0, pooling="mean")


@pytest.mark.slow  # the real embedded model
def test_mean_pooling_is_the_masked_mean_of_the_last_hidden_states(tok, mean_model):
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    assert int((batch["attention_mask"] == 0).sum()) > 0  # the batch really has padding
    with torch.inference_mode():
        out = mean_model.bert(**batch)
    h, m = out.last_hidden_state.double(), batch["attention_mask"].double().unsqueeze(-1)
    expected = (h * m).sum(1) / m.sum(1)
    torch.testing.assert_close(out.pooler_output.double(), expected, rtol=1e-6, atol=1e-6)
    assert isinstance(mean_model.bert.pooler, MaskedMeanPooler) and mean_model.bert.pooler.mask is None


@pytest.mark.slow  # the real embedded model
def test_padding_never_changes_a_sentence_logits(tok, mean_model):
    """Alone (no padding) and beside a much longer sentence (padded): the same logits. An unmasked mean fails."""
    with torch.inference_mode():
        alone = mean_model(**tok(SENTENCES[1:2], return_tensors="pt")).logits
        padded = mean_model(**tok(SENTENCES[1:], padding=True, return_tensors="pt")).logits[:1]
    torch.testing.assert_close(alone, padded, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # the real embedded model
def test_positional_attention_mask_reaches_the_pooler(tok, mean_model):
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.inference_mode():
        by_keyword = mean_model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
        by_position = mean_model.bert(batch["input_ids"], batch["attention_mask"]).pooler_output
    torch.testing.assert_close(by_keyword, by_position)


@pytest.mark.slow  # the real embedded model
def test_cls_pooling_keeps_the_model_pooler(tok):
    model = load_base_model(EMBEDDED_MODEL, 2, seed=0, pooling="cls")
    assert type(model.bert.pooler).__name__ == "BertPooler"
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.inference_mode():
        out = model.bert(**batch)
        expected = model.bert.pooler.activation(model.bert.pooler.dense(out.last_hidden_state[:, 0]))
    torch.testing.assert_close(out.pooler_output, expected)


def test_mean_pooling_refused_for_a_model_without_a_pooler(tmp_path):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    cfg = DistilBertConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=32)
    DistilBertForSequenceClassification(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model.pooling=cls") as err:
        load_base_model(str(tmp_path), 2, seed=0, pooling="mean")
    assert "\n" not in str(err.value)
    assert load_base_model(str(tmp_path), 2, seed=0, pooling="cls") is not None


def test_empty_mask_row_is_finite():
    pooler = MaskedMeanPooler()
    pooler.mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    out = pooler(torch.ones(2, 3, 4))
    assert np.isfinite(out.numpy()).all() and torch.allclose(out[0], torch.ones(4))
