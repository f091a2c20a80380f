"""What the suites share: the optimizer they all train with, the suite result type, the timing line."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedlora.bench.runs import RunRecord

# One optimizer and learning rate for every compared method of every suite (see optimizer_note for why).
OPTIMIZER = {"name": "adamw", "lr": 2e-3}


def optimizer_overrides() -> list[str]:
    return [f"optim.name={OPTIMIZER['name']}", f"optim.lr={OPTIMIZER['lr']}"]


def optimizer_note() -> str:
    return (
        f"optimizer: {OPTIMIZER['name']} lr {OPTIMIZER['lr']:g}, the same for every method. The FFA-LoRA paper "
        "used SGD; PLACEHOLDER"
    )


@dataclass
class SuiteOutput:
    markdown: str  # the suite's section of report.md (links relative to the output folder)
    results: dict  # raw numbers for results.json
    run_log: list[dict] = field(default_factory=list)  # one entry per run: cached | resumed | ran


def timing_note(size_name: str, records: list[RunRecord], estimate: str) -> str:
    total = sum(r.seconds for r in records)
    fresh = sum(r.status != "cached" for r in records)
    return (
        f"size `{size_name}`: {len(records)} runs, {total / 60:.1f} min of bench wall time when they were trained "
        f"({fresh} trained in this call, the rest from the cache); expected on 2 CPU cores: {estimate}."
    )
