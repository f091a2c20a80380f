"""Client training throughput: fedlora's `ClientTrainer.train` against a bare PEFT loop, same batches.

Both train the embedded MiniLM with LoRA on query/value plus the classifier head, AdamW, dropout off, on the
same example indices per step. The bare loop gets its batches tokenized and padded beforehand (the least work
a training loop can do); fedlora's time is the whole `train()` call: loading the downlink into the adapter,
collating, training, reading the factors back. Calls alternate, so load on a shared machine hits both alike.

`measure_client_throughput(...) -> list[dict]`, one row per mode (fedit: A and B trained; ffa: A frozen).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from fedlora.bench.dp_step import build_model, load_sentences


def _fedlora_trainer(mode: str, rank: int, batch_size: int, steps: int, max_length: int, lr: float, seed: int):
    """A ClientTrainer on a fresh model host, configured as a run would configure it."""
    from fedlora import lora
    from fedlora.client import ClientTrainer, Downlink
    from fedlora.config import load_config
    from fedlora.federated_run import build_strategy
    from fedlora.host import ModelHost

    cfg = load_config(None, [
        f"seed={seed}", f"strategy.name={mode}", f"lora.rank={rank}", f"lora.alpha={rank}",
        f"federation.batch_size={batch_size}", f"federation.local_steps={steps}", f"data.max_length={max_length}",
        "optim.name=adamw", f"optim.lr={lr}",
    ])
    host = ModelHost(cfg, 2, {rank})
    dims = lora.module_dims(host.model)
    trainer = ClientTrainer(cfg, host, build_strategy(cfg, dims))
    down = Downlink(rank=rank, factors=lora.initial_factors(seed, dims, rank, cfg.lora.scale(rank)), head={}, round=1)
    return cfg, host, trainer, down


def measure_client_throughput(
    steps: int = 12,
    batch_size: int = 32,
    max_length: int = 64,
    repeats: int = 3,
    modes: tuple[str, ...] = ("fedit", "ffa"),
    rank: int = 8,
    lr: float = 2e-3,
    threads: int | None = None,
    seed: int = 0,
) -> list[dict]:
    """Median samples/s of `ClientTrainer.train` and of a bare PEFT loop over `repeats` alternating calls."""
    from fedlora.client import encode, shuffled_batches

    if threads:
        torch.set_num_threads(threads)
    texts, labels = load_sentences(4 * steps * batch_size, seed)
    rows = []
    for mode in modes:
        cfg, host, trainer, down = _fedlora_trainer(mode, rank, batch_size, steps, max_length, lr, seed)
        data = encode(host.tokenizer, texts, np.asarray(labels), max_length)
        # The indices ClientTrainer.train draws for client 0 in round 1: the bare loop trains on the same ones.
        order = shuffled_batches(len(data), batch_size, steps, np.random.default_rng([seed, down.round, 0]))
        tok, bare = build_model(freeze_a=(mode == "ffa"), rank=rank, seed=seed)
        batches = []
        for idx in order:
            enc = dict(tok([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                           max_length=max_length))
            enc["labels"] = torch.tensor([labels[i] for i in idx])
            batches.append(enc)
        params = [p for p in bare.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr)

        def bare_loop() -> None:
            for batch in batches:
                bare(**batch).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

        ours_s, loop_s, bare_s = [], [], []
        for rep in range(repeats + 1):  # the first call of each warms up (allocator, lazy inits)
            t0 = time.perf_counter()
            update = trainer.train(0, down, data)
            t1 = time.perf_counter()
            bare_loop()
            t2 = time.perf_counter()
            if rep > 0:
                ours_s.append(t1 - t0)
                loop_s.append(update.train_s)
                bare_s.append(t2 - t1)
        samples = steps * batch_size
        ours, bare_sps = samples / statistics.median(ours_s), samples / statistics.median(bare_s)
        rows.append({
            "mode": mode,
            "lora_A": "trained" if mode != "ffa" else "frozen",
            "steps": steps,
            "batch_size": batch_size,
            "max_length": max_length,
            "mean_seq_len": float(statistics.mean(b["input_ids"].shape[1] for b in batches)),
            "threads": torch.get_num_threads(),
            "repeats": repeats,
            "fedlora_samples_per_s": ours,
            "fedlora_loop_samples_per_s": samples / statistics.median(loop_s),
            "bare_peft_samples_per_s": bare_sps,
            "ratio": ours / bare_sps,
        })
    return rows
