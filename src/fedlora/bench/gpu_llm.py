"""Causal-LM client training on random-weight Llama-shaped models: fedlora's `ClientTrainer` against a bare PEFT
loop, same batches, in the model's dtype (bf16 on the GPU). Tokens/s, peak memory and MFU per model size.

The models are built from a `LlamaConfig` on the device (no weights travel): the shapes of SmolLM2-135M,
Llama-3.2-1B and Llama-2-7B. Throughput and memory do not depend on the weights' values. The base is built once
per size: the bare loop wraps it with `get_peft_model`, trains, and `unload()`s it; then fedlora's `ModelHost`
wraps the same base and its `ClientTrainer` trains one client for the same steps on the same token ids.

MFU counts the nominal training FLOPs of a frozen base with LoRA (`train_flops_per_token`), the same for both
loops, against the chip's dense bf16 peak (`PEAK_BF16_FLOPS`); where the chip is not in that table no MFU is
given. fedlora's loss reads the LM head on the response positions only (`logits_to_keep`) while the bare loop
computes every position's logits, as `model(**batch).loss` does: a saving the nominal count does not credit.
"""

from __future__ import annotations

import gc
import statistics
import time
import types

import numpy as np
import torch

# Dense (no 2:4 sparsity) bf16 tensor-core peak, FLOP/s, by a name in torch.cuda.get_device_name(). NVIDIA's H200
# SXM datasheet gives 1,979 TFLOP/s for BF16 with sparsity, i.e. 989.5 dense (the H100 SXM's figure; the H200
# has the same compute and more memory). A product measured here ran at ~790 TFLOP/s (8192^3 bf16 matmul).
PEAK_BF16_FLOPS = {"H200": 989.5e12}

# name -> LlamaConfig arguments. Shapes of SmolLM2-135M, Llama-3.2-1B, Llama-2-7B; "tiny" for the CPU mode.
SHAPES = {
    "llama-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True),
}
TARGETS = ["q_proj", "v_proj"]


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def linear_params(config) -> int:
    """Parameters in the matrix products of one token's forward: every projection and the LM head (embedding
    look-ups are not products)."""
    d, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    return L * (2 * d * d + 2 * d * kv + 3 * d * i) + d * config.vocab_size


def train_flops_per_token(config, seq_len: int) -> float:
    """Nominal FLOPs of one training token with a frozen base: forward 2N, backward to the inputs 2N (no weight
    gradients but LoRA's, negligible at small rank), attention's score and value products 4·s·d per layer
    forward, twice that backward (the PaLM convention, causal masking not discounted)."""
    return 4.0 * linear_params(config) + 12.0 * config.num_hidden_layers * seq_len * config.hidden_size


def build_base(shape: str, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A random-weight LlamaForCausalLM of `shape`, built directly on `device` in `dtype`, eval mode."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)
    torch.manual_seed(seed)
    with torch.device(device):  # allocated and initialised there: a 7B model never passes through host memory
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to(device).eval()  # a no-op unless this transformers ignored the device context


def synthetic_client(vocab: int, examples: int, seq_len: int, response: int, seed: int = 0):
    """`examples` fixed-length token sequences, the last `response` tokens the response (what carries the loss)."""
    from fedlora.encoding import EncodedData

    rng = np.random.default_rng(seed)
    ids = [rng.integers(1, vocab, seq_len, dtype=np.int64) for _ in range(examples)]
    return EncodedData(ids, np.zeros(examples, np.int64), np.full(examples, seq_len - response, np.int64),
                       ["x"] * examples)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def measure_size(shape: str, device: torch.device, dtype: str = "bfloat16", batch: int = 8, seq_len: int = 512,
                 response: int = 64, steps: int = 6, repeats: int = 2, rank: int = 16, lr: float = 1e-4) -> list[dict]:
    """Two rows (bare PEFT loop, fedlora client) for one model size: median tokens/s over `repeats` calls of
    `steps` steps each after one warm-up call, peak memory over the measured calls, MFU where the peak is known."""
    from peft import LoraConfig, get_peft_model

    from fedlora import lora
    from fedlora.client import ClientTrainer, Downlink, shuffled_batches
    from fedlora.config import load_config
    from fedlora.federated_run import build_strategy
    from fedlora.host import DTYPES, ModelHost

    cfg = load_config(None, [
        "task=causal-lm", f"model.name=random-{shape}", f"model.device={device.type}", f"model.dtype={dtype}",
        f"lora.rank={rank}", f"lora.alpha={2 * rank}", f"lora.targets={TARGETS}", "strategy.name=fedit",
        f"federation.batch_size={batch}", f"federation.local_steps={steps}", f"data.max_length={seq_len}",
        "optim.name=adamw", f"optim.lr={lr}"])
    base = build_base(shape, DTYPES[dtype], device)
    params = sum(p.numel() for p in base.parameters())
    flops = train_flops_per_token(base.config, seq_len)
    peak = peak_flops(device)
    data = synthetic_client(base.config.vocab_size, 2 * batch * steps, seq_len, response)
    tokens = batch * seq_len * steps

    # The bare loop trains on the batches fedlora's trainer draws for client 0 in round 1.
    order = shuffled_batches(len(data), batch, steps, np.random.default_rng([cfg.seed, 1, 0]))
    batches = []
    for idx in order:
        ids = torch.from_numpy(np.stack([data.input_ids[i] for i in idx])).to(device)
        labels = ids.clone()
        labels[:, : seq_len - response] = -100
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    bare = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0,
                                           task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in bare.parameters() if p.requires_grad], lr=lr)

    def bare_call() -> float:
        _sync(device)
        t0 = time.perf_counter()
        for b in batches:
            bare(**b).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - t0

    def row(loop: str, seconds: list[float], peak_gib) -> dict:
        tps = tokens / statistics.median(seconds)
        return {"model": shape, "params": params, "loop": loop, "dtype": dtype, "batch": f"{batch}x{seq_len}",
                "tokens_per_s": tps, "peak_mem_GiB": peak_gib, "MFU": tps * flops / peak if peak else None}

    bare_call()
    _reset_peak(device)
    bare_s = [bare_call() for _ in range(repeats)]
    rows = [row("bare PEFT", bare_s, _peak_gib(device))]
    base = bare.unload()
    del bare, opt, batches
    gc.collect()

    host = ModelHost(cfg, 0, {rank}, base=base, tokenizer=types.SimpleNamespace(pad_token_id=0))
    dims = lora.module_dims(host.model)
    trainer = ClientTrainer(cfg, host, build_strategy(cfg, dims))
    down = Downlink(rank=rank, factors=lora.initial_factors(cfg.seed, dims, rank, cfg.lora.scale(rank)), head={},
                    round=1)

    def fedlora_call() -> float:
        _sync(device)
        t0 = time.perf_counter()
        trainer.train(0, down, data)  # ends reading the factors back to the host: synchronised
        return time.perf_counter() - t0

    fedlora_call()
    _reset_peak(device)
    ours_s = [fedlora_call() for _ in range(repeats)]
    rows.append(row("fedlora client", ours_s, _peak_gib(device)))
    rows[-1]["vs_bare"] = statistics.median(bare_s) / statistics.median(ours_s)
    del trainer, host, base
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows
