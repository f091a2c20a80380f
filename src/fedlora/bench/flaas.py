"""Suite `flaas`: federated learning as a service. Mixed-rank methods under planner-assigned ranks on a
heterogeneous device population, against the same methods at one rank everyone can afford.

Question: on a population of slow-uplink phones, tablets and laptops with a round deadline, does letting each
device train at the rank it can afford (fedlora.flaas.planner) beat giving everyone the rank the weakest
affords, in final accuracy, in simulated time to a target accuracy, and in bytes? The clients really train; only
the clock is simulated (each participant's round is its real samples' training FLOPs and its real bytes at its
profile's speeds, jittered per round; a client past the deadline is dropped as a straggler).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console

from fedlora.bench.common import SuiteOutput, optimizer_note, optimizer_overrides, timing_note
from fedlora.bench.runs import RunCache, RunRecord, RunSpec
from fedlora.bench.tables import fmt_bytes, fmt_mean_std, md_table

NAME = "flaas"
METHODS = {"rbla": "rbla", "zeropad": "zeropad", "hetlora": "hetlora", "ffa (nested)": "ffa", "flexlora": "flexlora"}
RANKS = (2, 4, 8, 16)  # what the planner may assign
TARGET = 0.70  # held-out accuracy whose simulated time-to-reach is compared
# Three device classes, two clients each. Scaled to the embedded 22.7M-parameter MiniLM so that ranks matter:
# its LoRA payload is small, so the uplinks are those of poor cellular links (a 7B model's rank-16 payload is
# ~100x larger, and ordinary uplinks bind the same way there).
PROFILES = (
    dict(device="phone", memory_mb=2048, upload_mbps=0.25, download_mbps=4, gflops=60, availability=0.8),
    dict(device="tablet", memory_mb=4096, upload_mbps=0.6, download_mbps=10, gflops=120, availability=0.9),
    dict(device="laptop", memory_mb=8192, upload_mbps=8, download_mbps=50, gflops=400, availability=1.0),
)
DEADLINE_S = 6.0
JITTER = 0.2


@dataclass(frozen=True)
class Size:
    seeds: tuple[int, ...]
    rounds: int
    local_steps: int
    max_eval: int
    methods: tuple[str, ...] = tuple(METHODS)
    num_clients: int = 6
    estimate: str = ""


SIZES: dict[str, Size] = {
    # 5 methods x 2 arms x 3 seeds = 30 runs of 6 clients x 4 rounds x 3 local steps of 16 examples.
    "full": Size(seeds=(0, 1, 2), rounds=4, local_steps=3, max_eval=200,
                 estimate="about 15-20 min with --jobs 2 (about 50 s of CPU a run)"),
    "quick": Size(seeds=(0,), rounds=3, local_steps=2, max_eval=100, methods=("rbla", "zeropad"),
                  estimate="about 3 min"),
    "smoke": Size(seeds=(0,), rounds=1, local_steps=1, max_eval=32, methods=("rbla",), num_clients=3,
                  estimate="under a minute (tests only)"),
}


def _profiles_toml() -> str:
    def value(v):
        return f'"{v}"' if isinstance(v, str) else repr(v)
    return "[" + ", ".join("{" + ", ".join(f"{k} = {value(v)}" for k, v in p.items()) + "}" for p in PROFILES) + "]"


def base_overrides(size: Size) -> list[str]:
    return [
        "data.name=rotten_tomatoes", "data.max_length=32", f"data.max_eval_examples={size.max_eval}",
        f"federation.num_clients={size.num_clients}", "federation.partition=iid", f"federation.rounds={size.rounds}",
        f"federation.local_steps={size.local_steps}", "federation.batch_size=16", "lora.alpha=8",
        "output.save_adapter=false", f"flaas.profiles={_profiles_toml()}", f"flaas.deadline_s={DEADLINE_S}",
        f"flaas.jitter={JITTER}", *optimizer_overrides(),
    ]


def spec(size: Size, method: str, arm: str, ranks: tuple[int, ...], seed: int) -> RunSpec:
    return RunSpec(labels=(("method", method), ("arm", arm)),
                   overrides=tuple(base_overrides(size) + [f"strategy.name={METHODS[method]}",
                                                           f"flaas.ranks={list(ranks)}"]), seed=seed)


def time_to_target(rec: RunRecord, target: float) -> float | None:
    """Simulated seconds until the held-out accuracy first reaches `target` (None: never)."""
    clock = 0.0
    for row in rec.metrics:
        clock += float(row.get("sim_round_s") or 0.0)
        if row["eval_accuracy"] >= target:
            return clock
    return None


def _summary(recs: list[RunRecord]) -> dict:
    acc = [r.summary["final_accuracy"] for r in recs]
    ttt = [time_to_target(r, TARGET) for r in recs]
    reached = [t for t in ttt if t is not None]
    return {
        "accuracy": acc, "time_to_target_s": ttt,
        "sim_total_s": [float(sum(r.series("sim_round_s"))) for r in recs],
        "bytes_up_total": [float(sum(r.series("bytes_up"))) for r in recs],
        "bytes_down_total": [float(sum(r.series("bytes_down"))) for r in recs],
        "stragglers": [sum(sum(v.startswith("straggler") for v in row["dropped_reasons"].values())
                           for row in r.metrics) for r in recs],
        "ranks": recs[0].metrics[0]["flaas_plan"]["ranks"] if recs and recs[0].metrics else {},
        "reached": f"{len(reached)}/{len(ttt)}",
        "time_to_target_mean": float(np.mean(reached)) if reached else None,
    }


def run(out: Path, size_name: str, console: Console, jobs: int = 1) -> SuiteOutput:
    size = SIZES[size_name]
    cache = RunCache(out, console, NAME)
    planned = cache.ensure_all([spec(size, m, "planned", RANKS, s) for m in size.methods for s in size.seeds], jobs)
    # The uniform arm: per method, the smallest rank its plan gave anyone (what every participant can afford).
    uniform_rank = {m: min(min(r.metrics[0]["flaas_plan"]["ranks"].values()) for r in planned
                           if r.spec.label("method") == m) for m in size.methods}
    uniform = cache.ensure_all([spec(size, m, "uniform", (uniform_rank[m],), s) for m in size.methods
                                for s in size.seeds], jobs)
    records = planned + uniform
    table, rows = {}, []
    for m in size.methods:
        table[m] = {}
        for arm in ("planned", "uniform"):
            recs = [r for r in records if r.spec.label("method") == m and r.spec.label("arm") == arm]
            t = table[m][arm] = _summary(recs)
            ttt = "not reached" if t["time_to_target_mean"] is None else f"{t['time_to_target_mean']:.1f} s"
            rows.append([m, arm, " ".join(f"{c}:{r}" for c, r in t["ranks"].items()), fmt_mean_std(t["accuracy"]),
                         f"{ttt} ({t['reached']})", f"{np.mean(t['sim_total_s']):.1f} s",
                         fmt_bytes(np.mean(t["bytes_up_total"])), fmt_bytes(np.mean(t["bytes_down_total"])),
                         f"{np.mean(t['stragglers']):.1f}"])
    sizes = records[0].to_json(out)["client_sizes"]
    devices = ", ".join(f"{p['device']} ({p['memory_mb']} MiB, up {p['upload_mbps']} / down {p['download_mbps']} "
                        f"Mbit/s, {p['gflops']} GFLOP/s, online {p['availability']:.0%})" for p in PROFILES)
    md = [
        f"# {NAME}: planned ranks on a simulated device population",
        "",
        "Each method runs twice on the same population, data, seeds and simulated clock: with the ranks the "
        f"server's planner assigns from the devices' profiles (candidates {list(RANKS)}), and with one rank for "
        "everyone, the smallest the plan gave anyone (the rank every participant can afford).",
        "",
        "## Protocol",
        "",
        f"- rotten_tomatoes (embedded), IID over {size.num_clients} clients ({', '.join(map(str, sizes))} "
        f"examples), held-out test capped at {size.max_eval}, max_length 32; embedded all-MiniLM-L6-v2, head "
        f"trained; LoRA α = 8 on query/value (scale α/r); {size.rounds} rounds, every client sampled, "
        f"{size.local_steps} local steps of batch 16; {optimizer_note()}",
        f"- devices, cycled over clients: {devices}. Round deadline {DEADLINE_S:g} simulated s; each round's "
        f"times jittered by a log-normal factor (σ = {JITTER}); an offline client (its availability) or one past "
        "the deadline takes no part in that round.",
        f"- time to target: simulated seconds until the held-out accuracy first reaches {TARGET} (mean over the "
        "seeds that reached it; reached/seeds in brackets). Bytes: summed over the run, as the server counted them.",
        f"- seeds {list(size.seeds)}; {timing_note(size_name, records, size.estimate)}",
        "",
        "## Results",
        "",
        md_table(["method", "arm", "plan (client:rank)", "final accuracy", f"time to {TARGET}", "simulated time",
                  "bytes up", "bytes down", "stragglers"], rows, right_from=3),
        "",
    ]
    results = {"settings": {**size.__dict__, "ranks": RANKS, "target": TARGET, "deadline_s": DEADLINE_S,
                            "jitter": JITTER, "profiles": PROFILES, "uniform_rank": uniform_rank},
               "table": table, "runs": [r.to_json(out) for r in records]}
    return SuiteOutput(markdown="\n".join(md), results=results, run_log=cache.log)
