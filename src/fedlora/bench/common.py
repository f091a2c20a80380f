"""What the suites share: the optimizer they all train with, the suite result type, the timing line."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedlora.bench.runs import RunRecord

# One optimizer and learning rate for every compared method of every suite (see optimizer_note for why).
OPTIMIZER = {"name": "adamw", "lr": 5e-3}


def optimizer_overrides() -> list[str]:
    return [f"optim.name={OPTIMIZER['name']}", f"optim.lr={OPTIMIZER['lr']}"]


def optimizer_note() -> str:
    return (
        f"optimizer: {OPTIMIZER['name']} lr {OPTIMIZER['lr']:g}, no weight decay, fresh per client and round, the "
        "same for every method (DP-SGD runs use the DP recipe stated with them). The FFA-LoRA paper used SGD; "
        "AdamW was chosen when the head read the model's CLS pooler (model.pooling=cls), whose features have a std "
        "of about 0.04, so SGD moved the head very slowly (centralized probe, batch 16: SGD lr 0.2 stayed at the "
        "majority class for 120 steps, AdamW 5e-3 reached 0.69 / 0.76 after 30 / 60 steps; under label skew 2e-3 "
        "was still at the minority class after 5 federated rounds). It is kept for the masked-mean pooling used "
        "now (Adam is invariant to the feature scale). With Adam the FFA paper's (α, lr) equivalence (only lr·s² "
        "matters under SGD) does not hold; α is fixed as stated."
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
        f"size `{size_name}`: {len(records)} runs, {total / 60:.1f} min summed over the runs' own wall times "
        f"(with --jobs N, N run at once; {fresh} trained in this call, the rest from the cache); expected on "
        f"2 CPU cores: {estimate}."
    )
