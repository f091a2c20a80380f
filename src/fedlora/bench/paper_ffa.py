"""Suite `paper-ffa`: the FFA-LoRA paper's DP protocol (arXiv 2403.12313) on the embedded data and model.

Claim under test: with sample-level DP-SGD and label-skewed clients, FFA-LoRA (A frozen and shared, only B
trained and sent) is more accurate than vanilla LoRA averaging (FedIT) at equal rank and steps, the gap
growing as epsilon shrinks, and it uploads about half as many LoRA bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console

from fedlora.bench import plots
from fedlora.bench.common import OPTIMIZER, SuiteOutput, optimizer_note, optimizer_overrides, timing_note
from fedlora.bench.runs import RunCache, RunRecord, RunSpec
from fedlora.bench.tables import epsilon_key, epsilon_label, fmt_bytes, fmt_mean_std, md_table, mean_std
from fedlora.config import PrivacyConfig

NAME = "paper-ffa"
# Rows are per-client label proportions [negative, positive]: positive fractions 0.1, 0.9 and 0.5.
LABEL_FRACTIONS = [[0.9, 0.1], [0.1, 0.9], [0.5, 0.5]]
DELTA = 1e-5
RANK = 8


@dataclass(frozen=True)
class Size:
    seeds: tuple[int, ...]
    rounds: int
    local_steps: int
    max_eval: int
    max_length: int
    epsilons: tuple[float | None, ...]  # None: no DP (epsilon = infinity)
    methods: tuple[str, ...] = ("ffa", "fedit")
    batch_size: int = 32
    dp_batch_size: int = 128  # DP-SGD's own recipe (privacy.batch_size / local_steps, SGD with momentum)
    dp_local_steps: int = 4
    estimate: str = ""


SIZES: dict[str, Size] = {
    # 2 methods x 4 privacy levels x 3 seeds = 24 runs of 3 clients x 6 rounds. Non-private: 10 local steps of 16
    # examples; DP-SGD: 5 steps of expected batch 64 (per-example gradients and Poisson batches cost ~25 samples/s
    # on one thread, so a DP run is ~5 min; batch 128 would double the suite).
    "full": Size(seeds=(0, 1, 2), rounds=6, local_steps=10, batch_size=16, max_eval=500, max_length=64,
                 epsilons=(1.0, 3.0, 6.0, None), dp_batch_size=64, dp_local_steps=5,
                 estimate="about 50 min with --jobs 2 on an idle 2-core CPU; several times longer when other "
                          "jobs compete for the cores"),
    "quick": Size(seeds=(0,), rounds=2, local_steps=2, batch_size=16, max_eval=200, max_length=32,
                  epsilons=(1.0, None), dp_batch_size=16, dp_local_steps=2,
                  estimate="about 1-2 min on an idle 2-core CPU"),
    "smoke": Size(seeds=(0,), rounds=1, local_steps=1, batch_size=16, max_eval=64, max_length=32,
                  epsilons=(1.0, None), dp_batch_size=16, dp_local_steps=1, estimate="under a minute (tests only)"),
}


def base_overrides(size: Size) -> list[str]:
    return [
        "data.name=rotten_tomatoes", f"data.max_length={size.max_length}", f"data.max_eval_examples={size.max_eval}",
        "federation.num_clients=3", "federation.partition=fractions",
        f"federation.label_fractions={LABEL_FRACTIONS}", f"federation.rounds={size.rounds}",
        f"federation.local_steps={size.local_steps}", f"federation.batch_size={size.batch_size}",
        f"lora.rank={RANK}", f"lora.alpha={RANK}", "output.save_adapter=false", *optimizer_overrides(),
    ]


def dp_recipe() -> str:
    """fedlora's default DP-SGD optimizer and clipping, as the report states them."""
    p = PrivacyConfig(mode="sample", epsilon=1.0)
    o = p.optim
    clipping = f"group clipping, LoRA factors to {p.lora_clip:g}" if p.clipping == "group" else "flat clipping"
    return (f"{clipping}; {o.name} with momentum {o.momentum:g}, lr {o.lr:g} for the LoRA factors and "
            f"{o.head_lr if o.head_lr is not None else o.lr:g} for the head")


def privacy_overrides(eps: float | None, size: Size) -> list[str]:
    if eps is None:
        return ["privacy.mode=none"]
    return ["privacy.mode=sample", f"privacy.epsilon={eps}", f"privacy.delta={DELTA}",
            f"privacy.batch_size={size.dp_batch_size}", f"privacy.local_steps={size.dp_local_steps}"]


def specs(size: Size) -> list[RunSpec]:
    base = base_overrides(size)
    return [
        RunSpec(labels=(("method", m), ("epsilon", eps)),
                overrides=tuple(base + privacy_overrides(eps, size) + [f"strategy.name={m}"]), seed=seed)
        for eps in size.epsilons for m in size.methods for seed in size.seeds
    ]


def _select(records: list[RunRecord], method: str, eps: float | None) -> list[RunRecord]:
    return [r for r in records if r.spec.label("method") == method and r.spec.label("epsilon") == eps]


def _paired_gap(records: list[RunRecord], a: str, b: str, eps: float | None) -> list[float]:
    """Per-seed accuracy difference a − b (same seed: same split, partition and init)."""
    by_seed = {r.spec.seed: r.summary["final_accuracy"] for r in _select(records, b, eps)}
    return [r.summary["final_accuracy"] - by_seed[r.spec.seed] for r in _select(records, a, eps) if r.spec.seed in by_seed]


def run(out: Path, size_name: str, console: Console, jobs: int = 1) -> SuiteOutput:
    size = SIZES[size_name]
    cache = RunCache(out, console, NAME)
    records = cache.ensure_all(specs(size), jobs)
    eps_cols = list(size.epsilons)

    # Final accuracy per (method, epsilon), and the paired FFA − FedIT gap.
    acc_rows, accuracy = [], {}
    for m in size.methods:
        accuracy[m] = {}
        cells = []
        for eps in eps_cols:
            vals = [r.summary["final_accuracy"] for r in _select(records, m, eps)]
            mean, std = mean_std(vals)
            accuracy[m][epsilon_key(eps)] = {"mean": mean, "std": std, "values": vals}
            cells.append(fmt_mean_std(vals))
        acc_rows.append([m, *cells])
    gaps = {}
    if {"ffa", "fedit"} <= set(size.methods):
        cells = []
        for eps in eps_cols:
            g = _paired_gap(records, "ffa", "fedit", eps)
            gaps[epsilon_key(eps)] = {"mean": mean_std(g)[0], "std": mean_std(g)[1], "values": g}
            cells.append(fmt_mean_std(g, digits=1, scale=100) + " pts")
        acc_rows.append(["ffa − fedit (paired by seed)", *cells])

    # Privacy actually spent (accountant, max over clients) and the calibrated sigma.
    eps_rows = []
    for eps in [e for e in eps_cols if e is not None]:
        for m in size.methods:
            recs = _select(records, m, eps)
            spent = [r.metrics[-1]["epsilon"] for r in recs]
            sigma = [r.metrics[-1]["noise_multiplier"] for r in recs]
            eps_rows.append([m, f"{eps:g}", fmt_mean_std(spent), fmt_mean_std(sigma), str(recs[0].metrics[-1]["dp_steps"])])

    # Communication per round: identical for every epsilon and seed, averaged over all runs of a method.
    comm_rows, comm = [], {}
    for m in size.methods:
        recs = [r for r in records if r.spec.label("method") == m]
        up = float(np.mean([np.mean(r.series("bytes_up")) for r in recs]))
        head = float(np.mean([np.mean(r.series("bytes_up_head")) for r in recs]))
        down = float(np.mean([np.mean(r.series("bytes_down")) for r in recs]))
        comm[m] = {"bytes_up_per_round": up, "bytes_up_lora_per_round": up - head, "bytes_down_per_round": down}
    for m in size.methods:
        ref = comm.get("fedit", comm[m])["bytes_up_lora_per_round"]
        c = comm[m]
        comm_rows.append([m, fmt_bytes(c["bytes_up_per_round"]), fmt_bytes(c["bytes_up_lora_per_round"]),
                          f"{c['bytes_up_lora_per_round'] / ref:.2f}", fmt_bytes(c["bytes_down_per_round"])])

    # Plots: accuracy per round for each privacy level; final accuracy against epsilon.
    png_rounds = plots.plot_curves_with_band(
        {f"ε = {epsilon_label(eps)}": {m: [r.accuracy_curve() for r in _select(records, m, eps)] for m in size.methods}
         for eps in eps_cols},
        out / "plots" / "accuracy_vs_rounds.png",
    )
    png_eps = plots.plot_errorbars(
        [epsilon_label(e).replace(" (no DP)", "") for e in eps_cols],
        {m: ([accuracy[m][epsilon_key(e)]["mean"] for e in eps_cols], [accuracy[m][epsilon_key(e)]["std"] for e in eps_cols])
         for m in size.methods},
        out / "plots" / "accuracy_vs_epsilon.png", xlabel="ε (δ = 1e-5; ∞ = no DP)", ylabel="final accuracy",
        title=f"final held-out accuracy, mean ± std over {len(size.seeds)} seed(s)",
    )

    sizes = records[0].to_json(out)["client_sizes"]
    md = [
        f"# {NAME}: FFA-LoRA vs vanilla LoRA (FedIT) under sample-level DP",
        "",
        "Claim (FFA-LoRA, arXiv 2403.12313): under DP-SGD and label skew, freezing the shared random A and training "
        "only B beats averaging both factors, increasingly so as ε shrinks, and halves the LoRA upload.",
        "",
        "## Protocol",
        "",
        f"- data: rotten_tomatoes (embedded, 12,808 sentences), stratified held-out test capped at {size.max_eval} "
        f"examples, max_length {size.max_length}; model: embedded all-MiniLM-L6-v2 (sequence classification).",
        f"- 3 clients ({', '.join(map(str, sizes))} examples), label skew: per-client [negative, positive] "
        f"proportions {LABEL_FRACTIONS}.",
        f"- LoRA r = α = {RANK} on query/value, classifier head trained and averaged (both methods); "
        f"{size.rounds} rounds, all clients every round; without DP {size.local_steps} local steps of batch "
        f"{size.batch_size} per round.",
        f"- DP: sample-level DP-SGD with fedlora's DP recipe, the same for both methods: {size.dp_local_steps} local "
        f"steps per round of expected batch {size.dp_batch_size} (Poisson sampling, q = batch/n_k), per-example "
        f"clip C = 1 ({dp_recipe()}), δ = {DELTA:g}; σ calibrated once per client "
        f"for all {size.rounds * size.dp_local_steps} local steps (RDP accountant).",
        f"- without DP: {optimizer_note()}",
        f"- seeds {list(size.seeds)}; mean ± std (sample std) over seeds.",
        f"- {timing_note(size_name, records, size.estimate)}",
        "",
        "## Final held-out accuracy",
        "",
        md_table(["method", *(f"ε = {epsilon_label(e)}" for e in eps_cols)], acc_rows),
        "",
        "## Privacy spent (accountant, max over clients)",
        "",
        md_table(["method", "target ε", "measured ε", "σ (noise multiplier)", "DP steps per client"], eps_rows)
        if eps_rows else "_no DP runs at this size_",
        "",
        "## Communication per round (3 clients, float32)",
        "",
        md_table(["method", "up (LoRA + head)", "up, LoRA only", "LoRA up vs fedit", "down"], comm_rows),
        "",
        "## Plots",
        "",
        f"![accuracy per round]({png_rounds.relative_to(out)})",
        "",
        f"![accuracy vs epsilon]({png_eps.relative_to(out)})",
        "",
    ]
    results = {
        "settings": {**size.__dict__, "optimizer": OPTIMIZER, "label_fractions": LABEL_FRACTIONS, "delta": DELTA,
                     "rank": RANK},
        "final_accuracy": accuracy, "ffa_minus_fedit": gaps, "communication": comm,
        "runs": [r.to_json(out) for r in records],
    }
    return SuiteOutput(markdown="\n".join(md), results=results, run_log=cache.log)
