"""Suite `comm`: compressed uploads (federation.compression = none | fp16 | int8 | topk) with FFA and FedIT.

Question: what does each codec cost in accuracy, and what does it save in bytes per round? Target (issue 19):
int8 within 0.5 points of none at about a quarter of the upload bytes. Bytes are what the clients really send
(fedlora.compression: the encoded change of what they send, with scales or indices), head included.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console

from fedlora.bench.common import SuiteOutput, optimizer_note, optimizer_overrides, timing_note
from fedlora.bench.runs import RunCache, RunRecord, RunSpec
from fedlora.bench.tables import fmt_bytes, fmt_mean_std, md_table, mean_std

NAME = "comm"
CODECS = ("none", "fp16", "int8", "topk")
RANK = 8
TOPK_FRACTION = 0.1  # 8 bytes per kept value (int32 index + float32): 0.8 bytes per value, near int8's 1


@dataclass(frozen=True)
class Size:
    seeds: tuple[int, ...]
    rounds: int
    local_steps: int
    max_eval: int
    max_length: int
    methods: tuple[str, ...] = ("ffa", "fedit")
    batch_size: int = 16
    estimate: str = ""


SIZES: dict[str, Size] = {
    # 2 methods x 4 codecs x 3 seeds = 24 runs of 3 clients x 4 rounds x 6 local steps of 16 examples, sized
    # to about 20 min of one core (a run of 5 rounds x 8 steps, eval 400 took 90 s of CPU).
    "full": Size(seeds=(0, 1, 2), rounds=4, local_steps=6, max_eval=300, max_length=48,
                 estimate="about 20 min of one core (about 50 s of CPU a run); longer in wall time when the "
                          "cores are shared"),
    "quick": Size(seeds=(0,), rounds=2, local_steps=2, max_eval=200, max_length=32,
                  estimate="about 2-3 min on an idle 2-core CPU"),
    "smoke": Size(seeds=(0,), rounds=1, local_steps=1, max_eval=64, max_length=32, methods=("ffa",),
                  estimate="under a minute (tests only)"),
}


def specs(size: Size) -> list[RunSpec]:
    base = [
        "data.name=rotten_tomatoes", f"data.max_length={size.max_length}", f"data.max_eval_examples={size.max_eval}",
        "federation.num_clients=3", "federation.partition=iid", f"federation.rounds={size.rounds}",
        f"federation.local_steps={size.local_steps}", f"federation.batch_size={size.batch_size}",
        f"lora.rank={RANK}", f"lora.alpha={RANK}", "output.save_adapter=false",
        f"federation.topk_fraction={TOPK_FRACTION}", "federation.int8_scale=row", *optimizer_overrides(),
    ]
    return [RunSpec(labels=(("method", m), ("codec", codec)),
                    overrides=tuple(base + [f"strategy.name={m}", f"federation.compression={codec}"]), seed=seed)
            for m in size.methods for codec in CODECS for seed in size.seeds]


def _select(records: list[RunRecord], method: str, codec: str) -> list[RunRecord]:
    return [r for r in records if r.spec.label("method") == method and r.spec.label("codec") == codec]


def run(out: Path, size_name: str, console: Console, jobs: int = 1) -> SuiteOutput:
    size = SIZES[size_name]
    cache = RunCache(out, console, NAME)
    records = cache.ensure_all(specs(size), jobs)
    rows, table = [], {}
    for m in size.methods:
        table[m] = {}
        base = {r.spec.seed: r.summary["final_accuracy"] for r in _select(records, m, "none")}
        none_up = float(np.mean([np.mean(r.series("bytes_up")) for r in _select(records, m, "none")]))
        for codec in CODECS:
            recs = _select(records, m, codec)
            acc = [r.summary["final_accuracy"] for r in recs]
            diff = [r.summary["final_accuracy"] - base[r.spec.seed] for r in recs if r.spec.seed in base]
            up = float(np.mean([np.mean(r.series("bytes_up")) for r in recs]))
            up_head = float(np.mean([np.mean(r.series("bytes_up_head")) for r in recs]))
            table[m][codec] = {"accuracy": acc, "minus_none": diff, "bytes_up_per_round": up,
                               "bytes_up_head_per_round": up_head, "ratio_to_none": up / none_up,
                               "accuracy_mean_std": mean_std(acc)}
            rows.append([m, codec, fmt_mean_std(acc), fmt_mean_std(diff, digits=2, scale=100) + " pts",
                         fmt_bytes(up), f"{up / none_up:.3f}", fmt_bytes(up - up_head)])
    sizes = records[0].to_json(out)["client_sizes"]
    md = [
        f"# {NAME}: compressed uploads (FFA and FedIT)",
        "",
        "Each client sends the change of what it sends this round (against what the server sent it), encoded: "
        "fp16; int8 with stochastic rounding and one float32 scale per LoRA slot (a row of A, a column of B, a "
        f"class of the head); or its top {TOPK_FRACTION:.0%} entries by magnitude as int32 index + float32 value, "
        "the rest kept on the client and added next round (error feedback). `none` sends float32 values.",
        "",
        "## Protocol",
        "",
        f"- rotten_tomatoes (embedded), IID over 3 clients ({', '.join(map(str, sizes))} examples), held-out test "
        f"capped at {size.max_eval}, max_length {size.max_length}; embedded all-MiniLM-L6-v2, head trained.",
        f"- LoRA r = α = {RANK} on query/value; {size.rounds} rounds, all clients every round, {size.local_steps} "
        f"local steps of batch {size.batch_size}; {optimizer_note()}",
        f"- seeds {list(size.seeds)}: the same split, partition and init per seed for every codec, so the "
        "difference to `none` is paired by seed.",
        f"- {timing_note(size_name, records, size.estimate)}",
        "",
        "## Final accuracy and upload per round",
        "",
        md_table(["method", "compression", "final accuracy", "− none (paired)", "up per round", "vs none",
                  "up, LoRA only"], rows, right_from=2),
        "",
    ]
    results = {"settings": {**size.__dict__, "rank": RANK, "topk_fraction": TOPK_FRACTION}, "table": table,
               "runs": [r.to_json(out) for r in records]}
    return SuiteOutput(markdown="\n".join(md), results=results, run_log=cache.log)
