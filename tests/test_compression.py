"""Upload codecs (fedlora.compression): unbiased int8 stochastic rounding, top-k error feedback, exact byte
counts, strict decoding, and the client/server round trip of an update."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.client_state import ClientStateStore
from fedlora.compression import (
    CompressionSpec, compress, decode_array, decompress, encode_array, payload_nbytes, residual_from_state,
    residual_state, topk_count,
)

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("scale", ["row", "tensor"])
def test_int8_stochastic_rounding_is_unbiased(scale):
    spec = CompressionSpec("int8", int8_scale=scale)
    x = RNG.normal(size=(6, 5)).astype(np.float32)
    x[:, 2] = 0.0  # an all-zero slice decodes to zeros
    rng = np.random.default_rng(1)
    n = 4000
    mean = sum(decode_array(encode_array(x, spec, rng), x.shape, spec) for _ in range(n)) / n
    # Per-row scales run along the short side: one per column of this 6 x 5 tensor.
    step = np.abs(x).max(axis=0, keepdims=True) / 127 if scale == "row" else np.abs(x).max() / 127
    # Each decode is within one step of x; the mean of n draws within a few standard errors (step / 2 / sqrt n).
    assert np.all(np.abs(mean - x) <= 5 * 0.5 * step / np.sqrt(n) + 1e-7)
    one = decode_array(encode_array(x, spec, rng), x.shape, spec)
    assert np.all(np.abs(one - x) <= step * (1 + 1e-5)) and np.all(one[:, 2] == 0)


def test_exact_byte_counts():
    x = RNG.normal(size=(16, 8)).astype(np.float32)
    rng = np.random.default_rng(0)
    assert payload_nbytes(encode_array(x, CompressionSpec("none"), rng)) == 16 * 8 * 4
    assert payload_nbytes(encode_array(x, CompressionSpec("fp16"), rng)) == 16 * 8 * 2
    # A d_out x r B pays one scale per slot (column), an r x d_in A one per row.
    assert payload_nbytes(encode_array(x, CompressionSpec("int8", "row"), rng)) == 16 * 8 + 8 * 4
    assert payload_nbytes(encode_array(x.T.copy(), CompressionSpec("int8", "row"), rng)) == 16 * 8 + 8 * 4
    assert payload_nbytes(encode_array(x, CompressionSpec("int8", "tensor"), rng)) == 16 * 8 + 4
    k = topk_count(128, 0.1)
    assert k == 13 and payload_nbytes(encode_array(x, CompressionSpec("topk", topk_fraction=0.1), rng)) == 8 * k
    # 1-D tensors (a head's bias) take one scale whatever int8_scale says.
    assert payload_nbytes(encode_array(x[0], CompressionSpec("int8", "row"), rng)) == 8 + 4


def test_topk_error_feedback_identity():
    """What was sent plus the new residual is exactly the change plus the old residual, every round; over many
    rounds, the sum of what was sent trails the sum of the changes by only the final residual."""
    spec = CompressionSpec("topk", topk_fraction=0.2)
    ref = {"m.B": np.zeros((10, 4), np.float32)}
    residual: dict = {}
    total_sent = np.zeros((10, 4))
    total_change = np.zeros((10, 4))
    rng = np.random.default_rng(0)
    for _ in range(20):
        change = RNG.normal(size=(10, 4)).astype(np.float32)
        old = residual.get("m.B", np.zeros((10, 4), np.float32))
        payload, residual = compress({"m.B": change}, ref, spec, rng, residual)
        sent = decompress(payload, ref, spec)["m.B"]
        assert np.count_nonzero(sent) <= topk_count(40, 0.2)
        np.testing.assert_allclose(sent + residual["m.B"], change + old, atol=1e-6)
        total_sent += sent
        total_change += change
    np.testing.assert_allclose(total_sent + residual["m.B"], total_change, atol=1e-4)


def test_lossy_codecs_send_the_change_against_the_reference():
    ref = {"m.B": RNG.normal(size=(8, 4)).astype(np.float32) * 100, "head.w": np.ones(3, np.float32)}
    now = {k: v + RNG.normal(size=v.shape).astype(np.float32) * 1e-3 for k, v in ref.items()}
    for codec in ("fp16", "int8"):
        spec = CompressionSpec(codec)
        payload, _ = compress(now, ref, spec, np.random.default_rng(0))
        back = decompress(payload, ref, spec)
        for k in ref:  # error relative to the change (1e-3), not to the values (100)
            assert np.max(np.abs(back[k] - now[k])) < 2e-5
    payload, _ = compress(now, ref, CompressionSpec("none"), np.random.default_rng(0))
    assert all(np.array_equal(decompress(payload, ref, CompressionSpec("none"))[k], now[k]) for k in ref)


@pytest.mark.parametrize("bad", [
    lambda p: p.pop("m.B|q"),
    lambda p: p.__setitem__("m.B|q", p["m.B|q"].astype(np.int16)),
    lambda p: p.__setitem__("m.B|s", np.full(4, np.inf, np.float32)),
    lambda p: p.__setitem__("m.B|s", np.ones(3, np.float32)),
    lambda p: p.__setitem__("m.B|q", np.full((8, 4), -128, np.int8)),
    lambda p: p.__setitem__("other|q", p["m.B|q"]),
])
def test_int8_decoding_refuses_what_the_encoder_cannot_produce(bad):
    spec = CompressionSpec("int8")
    ref = {"m.B": np.zeros((8, 4), np.float32)}
    payload, _ = compress({"m.B": RNG.normal(size=(8, 4))}, ref, spec, np.random.default_rng(0))
    bad(payload)
    with pytest.raises(ValueError):
        decompress(payload, ref, spec)


@pytest.mark.parametrize("idx", [[0, 0, 1, 2], [3, 2, 1, 0], [0, 1, 2, 32], [-1, 0, 1, 2]])
def test_topk_decoding_refuses_bad_indices(idx):
    spec = CompressionSpec("topk", topk_fraction=0.1)  # 32 values -> k = 4
    payload = {"i": np.asarray(idx, np.int32), "v": np.ones(4, np.float32)}
    with pytest.raises(ValueError):
        decode_array(payload, (8, 4), spec)


def test_residual_lives_in_the_client_store_by_round():
    store = ClientStateStore()
    residual = {"m.B": np.arange(4, dtype=np.float32)}
    store.save(3, 2, {"personal/m.B": np.ones(2)} | residual_state(residual))
    state = store.load(3, before_round=3)
    assert set(state) == {"personal/m.B", "ef/m.B"}
    np.testing.assert_array_equal(residual_from_state(state)["m.B"], residual["m.B"])
    assert store.load(3, before_round=2) == {}  # a resumed round 2 starts from no residual


def test_spec_checks():
    with pytest.raises(ValueError):
        CompressionSpec("zip")
    with pytest.raises(ValueError):
        CompressionSpec("topk", topk_fraction=0.0)
