"""The GPU check's sections: each a generator of table rows, run through fedlora's own code (`fedlora.run`, the
`ClientTrainer`, `BatchedRound`), with sizes from a `Sizes` (the device's, or the seconds-long CPU `TINY`).

- environment: the machine and the library versions the numbers are read against.
- default: the default experiment (`fedlora run` on model.device), its accuracy beside the CPU reference.
- batched: a round's clients trained together vs one by one, same downlinks and batches, at 10 and 50 clients.
- dp: DP-SGD rounds (privacy.mode=sample) vs non-private rounds of the default experiment, samples/s.
- llm: fedlora's causal-LM client vs a bare PEFT loop on random Llama-shaped models (fedlora.bench.gpu_llm).

Tiny mode (`tiny_assets`) swaps the embedded MiniLM and Rotten Tomatoes for a random 2-layer BERT (the embedded
tokenizer) and a generated CSV, so the whole check runs in seconds on a CPU and the suite keeps it from rotting.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

# The default experiment on CPU (docs/benchmarks.md, `time fedlora run`, 2-core machine, 2026-12-03).
CPU_REFERENCE = {"final_accuracy": 0.781, "per_round": [0.728, 0.755, 0.756, 0.779, 0.774, 0.781], "wall_s": 268.0}


@dataclass
class Sizes:
    """What the sections run: the device's sizes, or TINY's."""

    device: str = "cuda"
    overrides: list[str] = field(default_factory=list)  # applied to every fedlora config (tiny: model and data)
    default_overrides: list[str] = field(default_factory=list)  # the default experiment: none on the device
    clients: tuple[int, ...] = (10, 50)
    batched_steps: int = 10
    repeats: int = 2
    dp_rounds: int = 2
    dp_overrides: list[str] = field(default_factory=lambda: ["privacy.mode=sample", "privacy.epsilon=3"])
    llm_shapes: tuple[str, ...] = ("llama-135m", "llm-1b", "llama-7b")
    llm: dict = field(default_factory=dict)  # gpu_llm.measure_size keyword arguments


DEVICE = Sizes(llm_shapes=("llama-135m", "llama-1b", "llama-7b"))


def tiny_sizes(assets: Path) -> Sizes:
    """Seconds on a CPU: a random 2-layer BERT, 90 generated sentences, 2 and 3 clients, a 2-layer Llama."""
    common = [f"model.name={assets / 'bert'}", "data.name=csv", f"data.path={assets / 'data.csv'}",
              "data.max_length=16", "federation.partition=iid", "federation.batch_size=4", "eval.batch_size=32"]
    return Sizes(device="cpu", overrides=common,
                 default_overrides=["federation.num_clients=3", "federation.rounds=1", "federation.local_steps=2"],
                 clients=(2, 3), batched_steps=1, repeats=1, dp_rounds=1,
                 # an explicit sigma: calibrating one to a target epsilon takes seconds of CPU here
                 dp_overrides=["privacy.mode=sample", "privacy.noise_multiplier=1.0"], llm_shapes=("tiny",),
                 # float32: bf16 matrix products are slow on many CPUs (the device runs bf16)
                 llm=dict(dtype="float32", batch=2, seq_len=16, response=4, steps=2, repeats=1, rank=4))


def tiny_assets(folder: Path) -> Path:
    """A random-weight 2-layer BERT with the embedded MiniLM's tokenizer, and a 90-row two-class CSV, in `folder`."""
    from transformers import BertConfig, BertModel

    from fedlora.host import load_tokenizer

    tok = load_tokenizer("embedded:all-MiniLM-L6-v2")
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=64))
    model.save_pretrained(folder / "bert")
    tok.save_pretrained(folder / "bert")
    rng = np.random.default_rng(0)
    words = {"pos": ["good", "great", "fine", "warm"], "neg": ["bad", "dull", "poor", "cold"]}
    filler = ["the", "film", "a", "story", "was", "and", "plot", "cast"]
    lines = ["text,label"]
    for i in range(90):
        label = "pos" if i % 2 else "neg"
        text = " ".join(rng.choice(filler + words[label], 8)) + f" {i}"
        lines.append(f"{text},{label}")
    (folder / "data.csv").write_text("\n".join(lines) + "\n")
    return folder


def environment(sizes: Sizes) -> Iterator[dict]:
    import peft
    import transformers

    from fedlora.bench.gpu_llm import peak_flops

    dev = torch.device(sizes.device)
    gpu = dev.type == "cuda" and torch.cuda.is_available()
    yield {"device": dev.type, "device_name": torch.cuda.get_device_name(dev) if gpu else platform.machine(),
           "memory_GiB": torch.cuda.get_device_properties(dev).total_memory / 2**30 if gpu else None,
           "bf16_peak_TFLOPs": peak_flops(dev) / 1e12 if gpu and peak_flops(dev) else None,
           "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
           "peft": peft.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
           "loadavg": _loadavg()}
    if dev.type == "cuda" and not gpu:
        raise RuntimeError("torch sees no CUDA device (torch.cuda.is_available() is False)")


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "?"


def _run(sizes: Sizes, extra: list[str]) -> tuple[dict, list[dict], float]:
    """fedlora.run on sizes.device with the sizes' overrides + `extra`: (summary, metrics rows, wall seconds)."""
    import fedlora

    with tempfile.TemporaryDirectory(prefix="gpu-check-run-") as out:
        t0 = time.perf_counter()
        result = fedlora.run(overrides=[f"model.device={sizes.device}", *sizes.overrides, *extra], out=Path(out) / "run")
        return result.summary, result.metrics, time.perf_counter() - t0


def default_experiment(sizes: Sizes) -> Iterator[dict]:
    summary, rows, wall = _run(sizes, sizes.default_overrides)
    ref = CPU_REFERENCE if not sizes.default_overrides else None  # the reference holds for the default only
    yield {"device": sizes.device, "rounds": summary["rounds"], "accuracy_per_round": [r["eval_accuracy"] for r in rows],
           "final_accuracy": summary["final_accuracy"], "cpu_final_accuracy": ref and ref["final_accuracy"],
           "difference_pts": ref and 100 * (summary["final_accuracy"] - ref["final_accuracy"]),
           "train_samples_per_s": summary["train_samples_per_s"], "wall_s": wall,
           "cpu_wall_s": ref and ref["wall_s"]}


def batched_vs_one_by_one(sizes: Sizes) -> Iterator[dict]:
    """Median samples/s of one round trained one by one and batched (same downlinks, same batches; the order
    alternates over repeats, after one warm-up of each), and the largest relative difference of the two ways'
    changes (float32 rounding; tests/test_batched.py bounds it)."""
    from fedlora import lora
    from fedlora.batched import BatchedRound, why_not_batched
    from fedlora.client import ClientTrainer
    from fedlora.config import load_config
    from fedlora.experiment import prepare_data
    from fedlora.federated_run import build_strategy
    from fedlora.host import ModelHost, load_tokenizer
    from fedlora.server import Server

    widest = max(sizes.clients)
    cfg = load_config(None, [f"model.device={sizes.device}", *sizes.overrides, f"federation.num_clients={widest}",
                             f"federation.local_steps={sizes.batched_steps}", "federation.partition=iid"])
    data = prepare_data(cfg, load_tokenizer(cfg.model.name))
    host = ModelHost(cfg, len(data.label_names), set(cfg.client_ranks()))
    dims = lora.module_dims(host.model)
    trainer = ClientTrainer(cfg, host, build_strategy(cfg, dims))
    head = lora.get_head(host.model, host.ensure_rank(max(cfg.client_ranks())))
    server = Server(cfg, trainer.strategy, dims, head, [len(d) for d in data.clients])
    why = why_not_batched(trainer, 1, private=False)
    if why:
        raise RuntimeError(f"the default round cannot be batched: {why}")
    for k in sizes.clients:
        jobs = [(c, server.downlink(c), data.clients[c]) for c in range(k)]
        speed: dict[str, list[float]] = {"one": [], "batched": []}
        gap = 0.0
        for rep in range(sizes.repeats + 1):
            out = {}
            for way in ("one", "batched") if rep % 2 == 0 else ("batched", "one"):
                t0 = time.perf_counter()
                out[way] = [trainer.train(c, d, x) for c, d, x in jobs] if way == "one" \
                    else BatchedRound(trainer).train(jobs)
                if rep > 0:  # repeat 0 warms both ways up (allocator, kernels)
                    speed[way].append(sum(u.samples for u in out[way]) / (time.perf_counter() - t0))
            gap = max([gap] + [relative_change_gap(a, b, d) for a, b, (_, d, _) in zip(out["one"], out["batched"], jobs)])
        one, bat = statistics.median(speed["one"]), statistics.median(speed["batched"])
        yield {"clients": k, "local_steps": sizes.batched_steps, "one_by_one_samples_per_s": one,
               "batched_samples_per_s": bat, "speedup": bat / one, "max_change_diff": gap}


def relative_change_gap(a, b, down) -> float:
    """‖change_b − change_a‖ / ‖change_a‖ over every factor, each change from the downlink in the client's scale
    (how far batched training `b` lands from one-by-one `a`; bench/bench_batched.py reports it too)."""
    num = den = 0.0
    for m, f in a.factors.items():
        s = down.factors[m]
        for x, y, x0 in ((f.A, b.factors[m].A, s.A), (f.B, b.factors[m].B, s.B * (s.scale / f.scale))):
            num += float(np.sum((np.float64(y) - x) ** 2))
            den += float(np.sum((np.float64(x) - x0) ** 2))
    return (num / den) ** 0.5 if den else 0.0


def dp_vs_plain(sizes: Sizes) -> Iterator[dict]:
    """The default experiment's rounds without DP and with DP-SGD (ε = 3 on the device, its own recipe): samples
    per second of training time and of round wall time (median over rounds), final accuracy, ε spent."""
    plain_sps = None
    for name, extra in (("none", []), ("DP-SGD", sizes.dp_overrides)):
        summary, rows, wall = _run(sizes, [*sizes.default_overrides, f"federation.rounds={sizes.dp_rounds}", *extra])
        round_sps = statistics.median(r["samples"] / r["wall_s"] for r in rows)
        plain_sps = plain_sps or round_sps
        yield {"privacy": name, "settings": " ".join(extra) or "privacy.mode=none", "rounds": len(rows), "round_samples_per_s": round_sps,
               "train_samples_per_s": summary["train_samples_per_s"], "vs_non_private": round_sps / plain_sps,
               # before vs final: that training moved the adapter on this device (Opacus #820 froze LoRA on GPUs)
               "accuracy_before": summary["accuracy_before"], "final_accuracy": summary["final_accuracy"],
               "epsilon": summary.get("final_epsilon"), "wall_s": wall}


def causal_lm(sizes: Sizes) -> Iterator[dict]:
    from fedlora.bench.gpu_llm import measure_size

    for shape in sizes.llm_shapes:
        yield from measure_size(shape, torch.device(sizes.device), **sizes.llm)


# name -> (title, function, seconds it may take on the device)
SECTIONS = {
    "environment": ("Machine and versions", environment, 60),
    "default": ("The default experiment (`fedlora run`) on the device, beside the CPU reference", default_experiment, 150),
    "batched": ("A round's clients trained batched vs one by one (same downlinks and batches, IID)",
                batched_vs_one_by_one, 90),
    "dp": ("DP-SGD rounds vs non-private rounds of the default experiment", dp_vs_plain, 120),
    "llm": ("Causal-LM client training on random-weight Llama shapes: fedlora vs a bare PEFT loop", causal_lm, 200),
}
