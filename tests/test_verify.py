"""Verifiable adapters without a model: the global state's digest and norm, the manifest and what breaks it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fedlora import adapter_digest
from fedlora.strategies import LoraFactors
from fedlora.verify import VerificationError, base_identity, check_base, verify_adapter, write_manifest


def _state(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    factors = {f"m{i}": LoraFactors(A=rng.normal(size=(4, 6)).astype(dtype), B=rng.normal(size=(5, 4)).astype(dtype),
                                    scale=0.5) for i in range(3)}
    head = {"w": rng.normal(size=(2, 6)).astype(np.float32)}
    base = {"m1": rng.normal(size=(5, 6))}
    return factors, head, base


def test_digest_is_of_the_values_and_sees_every_change():
    factors, head, base = _state()
    d = adapter_digest.digest(adapter_digest.global_tensors(factors, head, base))
    assert d == adapter_digest.digest(adapter_digest.global_tensors(*_state()))  # same values, same digest
    factors["m2"].B[4, 3] = np.nextafter(factors["m2"].B[4, 3], np.float32(np.inf))  # one ulp
    assert adapter_digest.digest(adapter_digest.global_tensors(factors, head, base)) != d
    assert adapter_digest.digest(adapter_digest.global_tensors(*_state(dtype=np.float64))) != d  # dtype counts
    f, h, b = _state()
    f["m0"] = LoraFactors(A=f["m0"].A, B=f["m0"].B, scale=0.25)  # the scale is part of the model
    assert adapter_digest.digest(adapter_digest.global_tensors(f, h, b)) != d


def test_delta_norm_is_the_frobenius_norm_of_what_is_added_to_the_base():
    factors, _, base = _state(dtype=np.float64)
    dense = {n: f.scale * f.B @ f.A for n, f in factors.items()}
    dense["m1"] = dense["m1"] + base["m1"]
    expected = np.sqrt(sum(np.sum(d ** 2) for d in dense.values()))
    assert adapter_digest.delta_norm(factors, base) == pytest.approx(expected, rel=1e-12)


def test_kept_round_file_reads_back_to_the_same_digest(tmp_path):
    tensors = adapter_digest.global_tensors(*_state())
    path = adapter_digest.keep_round(tmp_path, 7, tensors)
    assert path.name == "round-0007.safetensors"
    assert adapter_digest.digest(adapter_digest.read_round(path)) == adapter_digest.digest(tensors)


def _adapter(folder, values=None):
    folder.mkdir()
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4) if values is None else values
    save_file({"base_model.model.x.lora_A.weight": w, "base_model.model.x.lora_B.weight": w.T.contiguous()},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 3}))
    (folder / "fedlora.json").write_text(json.dumps({"model": "m"}))
    return write_manifest(folder, config_toml="seed = 0\n", global_sha256="cd" * 32, base={"name": "m", "files": {}})


def test_manifest_lists_files_tensors_and_hashes(tmp_path):
    m = _adapter(tmp_path / "a")
    assert set(m["files"]) == {"adapter_model.safetensors", "adapter_config.json", "fedlora.json"}
    assert m["tensors"]["base_model.model.x.lora_B.weight"] == {"shape": [4, 3], "dtype": "float32"}
    assert m["all_finite"] is True and len(m["config_sha256"]) == 64
    assert verify_adapter(tmp_path / "a")["global_adapter_sha256"] == "cd" * 32


@pytest.mark.parametrize("damage", ["flip_byte", "add_file", "remove_file", "edit_json", "edit_manifest_shape"])
def test_any_change_fails_in_one_line(tmp_path, damage):
    folder = tmp_path / "a"
    _adapter(folder)
    if damage == "flip_byte":
        weights = folder / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0x01
        weights.write_bytes(bytes(data))
    elif damage == "add_file":
        (folder / "adapter_model.bin").write_bytes(b"x")
    elif damage == "remove_file":
        (folder / "fedlora.json").unlink()
    elif damage == "edit_json":
        (folder / "adapter_config.json").write_text(json.dumps({"r": 4}))
    else:  # a manifest edited to match nothing
        m = json.loads((folder / "manifest.json").read_text())
        m["tensors"]["base_model.model.x.lora_A.weight"]["shape"] = [4, 3]
        (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(VerificationError) as exc:
        verify_adapter(folder)
    assert "\n" not in str(exc.value)


def test_non_finite_adapter_is_refused(tmp_path):
    m = _adapter(tmp_path / "a", values=torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    assert m["all_finite"] is False
    with pytest.raises(VerificationError, match="non-finite"):
        verify_adapter(tmp_path / "a")


def test_no_manifest_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(VerificationError, match="no manifest.json"):
        verify_adapter(tmp_path / "a")


def test_base_identity_detects_other_base_files(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes(b"weights")
    manifest = {"base_model": base_identity("m", base)}
    assert set(manifest["base_model"]["files"]) == {"config.json", "model.safetensors"}
    check_base(manifest, base)
    (base / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(VerificationError, match="differs from the one the adapter was trained on"):
        check_base(manifest, base)
