"""Suite `paper-rbla`: clients of mixed LoRA ranks (RBLA, arXiv 2408.08699) against the other mixed-rank methods.

Claim under test: zero-padding averages slot j over every client, so slots only high-rank clients train shrink
by c_j per factor (c_j² in the product); RBLA averages each slot over the clients that hold it and keeps them.
Measured: held-out accuracy per round and the norm of the global adapter per rank slot after the last round.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console

from fedlora.bench import plots
from fedlora.bench.common import OPTIMIZER, SuiteOutput, optimizer_note, optimizer_overrides, timing_note
from fedlora.bench.rbla_diagnostics import diagnose
from fedlora.bench.runs import RunCache, RunRecord, RunSpec
from fedlora.bench.tables import fmt_bytes, fmt_mean_std, md_table
from fedlora.checkpoint import load_checkpoint

NAME = "paper-rbla"
ALPHA = 8.0  # LoRA alpha for every rank (scale alpha/r), as in paper-ffa where the learning rate was chosen
DIRICHLET_ALPHA = 1.0
NOT_APPLICABLE = "n/a: fresh LoRA every round, merged into the base weights (no global adapter)"


@dataclass(frozen=True)
class Size:
    seeds: tuple[int, ...]
    rounds: int
    local_steps: int
    max_eval: int
    max_length: int
    variants: tuple[tuple[str, tuple[int, ...]], ...]  # (name, per-client ranks)
    methods: tuple[str, ...]
    batch_size: int = 32
    estimate: str = ""


ALL_METHODS = ("rbla", "zeropad", "hetlora", "flora", "flexlora", "ffa")
MIXED = ("mixed", (2, 4, 8, 16))
HEAVY_TAIL = ("heavy-tail", (2, 2, 2, 2, 2, 16))

SIZES: dict[str, Size] = {
    # 6 methods x 2 variants x 3 seeds = 36 runs of 4 or 6 clients x 48 local steps of 16 examples: ~10 s (4
    # clients) or ~13 s (6 clients) per round on an idle 2-core CPU, plus ~10 s of loading per run.
    "full": Size(seeds=(0, 1, 2), rounds=6, local_steps=8, batch_size=16, max_eval=500, max_length=64,
                 variants=(MIXED, HEAVY_TAIL), methods=ALL_METHODS,
                 estimate="about 31 min with --jobs 2 on an idle 2-core CPU (measured), about 45-55 min with one job; "
                          "several times longer when other jobs compete for the cores"),
    "quick": Size(seeds=(0,), rounds=2, local_steps=2, batch_size=16, max_eval=200, max_length=32,
                  variants=(MIXED, HEAVY_TAIL), methods=("rbla", "zeropad", "flora"),
                  estimate="about 2 min on an idle 2-core CPU"),
    "smoke": Size(seeds=(0,), rounds=1, local_steps=1, batch_size=16, max_eval=64, max_length=32,
                  variants=(("heavy-tail", (2, 2, 16)),), methods=("rbla", "flora"),
                  estimate="under a minute (tests only)"),
}


def specs(size: Size) -> list[RunSpec]:
    out = []
    for variant, ranks in size.variants:
        base = [
            "data.name=rotten_tomatoes", f"data.max_length={size.max_length}",
            f"data.max_eval_examples={size.max_eval}", f"federation.num_clients={len(ranks)}",
            "federation.partition=dirichlet", f"federation.alpha={DIRICHLET_ALPHA}",
            f"federation.ranks={list(ranks)}", f"federation.rounds={size.rounds}",
            f"federation.local_steps={size.local_steps}", f"federation.batch_size={size.batch_size}",
            f"lora.rank={max(ranks)}", f"lora.alpha={ALPHA}", "lora.scaling=alpha/r",  # the protocol's rule, pinned
            "output.save_adapter=false", *optimizer_overrides(),
        ]
        for m in size.methods:
            for seed in size.seeds:
                out.append(RunSpec(labels=(("variant", variant), ("method", m)),
                                   overrides=tuple(base + [f"strategy.name={m}"]), seed=seed))
    return out


def slot_norms(run_dir: Path, r_max: int) -> list[float] | None:
    """Per rank slot j: Σ over modules of s·‖B[:, j]‖·‖A[j, :]‖ of the final global adapter (None for FLoRA).

    Read from the checkpoint's widest downlink. A slot the server no longer serves (a HetLoRA client pruned
    the widest rank) counts as 0: the global model has nothing there.
    """
    downlinks = load_checkpoint(run_dir / "checkpoint")["server"]["downlinks"]
    if not downlinks:
        return None
    factors = downlinks[max(downlinks, key=int)]
    norms = np.zeros(r_max)
    for f in factors.values():
        A, B = np.asarray(f.A, np.float64), np.asarray(f.B, np.float64)
        norms[: A.shape[0]] += abs(f.scale) * np.linalg.norm(B, axis=0) * np.linalg.norm(A, axis=1)
    return norms.tolist()


def rank_bands(ranks: tuple[int, ...]) -> list[tuple[int, int]]:
    """1-based slot ranges between consecutive distinct ranks, e.g. (2, 4, 8) -> [(1, 2), (3, 4), (5, 8)]."""
    edges = sorted(set(ranks))
    return [(lo + 1, hi) for lo, hi in zip([0, *edges[:-1]], edges)]


def _variant_section(out: Path, variant: str, ranks: tuple[int, ...], records: list[RunRecord], size: Size):
    r_max = max(ranks)
    bands = rank_bands(ranks)
    acc_rows, slot_rows, numbers = [], [], {}
    for m in size.methods:
        recs = [r for r in records if r.spec.label("method") == m]
        finals = [r.summary["final_accuracy"] for r in recs]
        norms = [slot_norms(r.run_dir, r_max) for r in recs]
        up = float(np.mean([np.mean(r.series("bytes_up")) for r in recs]))
        down = float(np.mean([np.mean(r.series("bytes_down")) for r in recs]))
        numbers[m] = {"final_accuracy": finals, "best_accuracy": [r.summary["best_accuracy"] for r in recs],
                      "bytes_up_per_round": up, "bytes_down_per_round": down,
                      "slot_norms": None if norms[0] is None else norms}
        acc_rows.append([m, fmt_mean_std(finals), fmt_mean_std(numbers[m]["best_accuracy"]), fmt_bytes(up), fmt_bytes(down)])
        if norms[0] is None:
            slot_rows.append([m, NOT_APPLICABLE, *[""] * (len(bands) - 1), "–"])
        else:
            mean = np.mean(np.asarray(norms), axis=0)
            per_band = [float(mean[lo - 1:hi].mean()) for lo, hi in bands]
            ratio = per_band[-1] / per_band[0] if per_band[0] > 0 else float("nan")
            slot_rows.append([m, *(f"{v:.3g}" for v in per_band), f"{ratio:.3g}"])
    # Diagnostics (issue 18) of the pair in question: cut-off accuracy per client rank, prediction shares.
    diag_rows = []
    for m in ("rbla", "zeropad"):
        recs = [r for r in records if r.spec.label("method") == m]
        if not recs:
            continue
        ds = [d for d in diagnose([r.run_dir for r in recs]).values() if d]
        numbers[m]["diagnostics"] = ds
        cuts = [f"{np.mean([d['cutoff_accuracy'][str(k)] for d in ds]):.3f}" for k in sorted(set(ranks))]
        share = [d["pred_fractions"][1] for d in ds]
        diag_rows.append([m, *cuts, f"{np.mean(share):.2f} ({min(share):.2f}–{max(share):.2f})"])
    md = [
        f"### {variant}: client ranks {list(ranks)}",
        "",
        md_table(["method", "final accuracy", "best accuracy", "up per round", "down per round"], acc_rows),
        "",
        "Mean slot norm of the final global adapter per band of rank slots (slots above a client's rank are "
        "trained only by the clients of higher rank); last column: widest band / first band.",
        "",
        md_table(["method", *(f"slots {lo}–{hi}" for lo, hi in bands), "tail / head"], slot_rows),
        "",
        "Diagnostics of the final global adapter (fedlora.bench.rbla_diagnostics): held-out accuracy with every "
        "slot above k removed, for k in the client ranks (mean over seeds), and the share of held-out predictions "
        "that are the positive class (mean, range).",
        "",
        md_table(["method", *(f"cut at {k}" for k in sorted(set(ranks))), "positive share"], diag_rows),
        "",
    ]
    return md, numbers


def run(out: Path, size_name: str, console: Console, jobs: int = 1) -> SuiteOutput:
    size = SIZES[size_name]
    cache = RunCache(out, console, NAME)
    records = cache.ensure_all(specs(size), jobs)
    md_variants, numbers, curves, norm_panels, marks = [], {}, {}, {}, {}
    for variant, ranks in size.variants:
        recs = [r for r in records if r.spec.label("variant") == variant]
        md, numbers[variant] = _variant_section(out, variant, ranks, recs, size)
        md_variants += md
        title = f"{variant} {list(ranks)}"
        curves[title] = {m: [r.accuracy_curve() for r in recs if r.spec.label("method") == m] for m in size.methods}
        norm_panels[title] = {m: v["slot_norms"] for m, v in numbers[variant].items() if v["slot_norms"] is not None}
        marks[title] = sorted(set(ranks))[:-1]
    png_acc = plots.plot_curves_with_band(curves, out / "plots" / "rbla_accuracy_vs_rounds.png")
    png_norms = plots.plot_slot_norms(norm_panels, out / "plots" / "rbla_slot_norms.png", marks)

    md = [
        f"# {NAME}: mixed client ranks — RBLA vs zero-padding, HetLoRA, FLoRA, FlexLoRA, nested FFA",
        "",
        "Claim (RBLA, arXiv 2408.08699): zero-padding dilutes the rank slots only high-rank clients train (by c_j "
        "per factor, c_j = weight share of the clients holding slot j); rank-based averaging keeps them.",
        "",
        "## Protocol",
        "",
        f"- data: rotten_tomatoes (embedded), Dirichlet label partition α = {DIRICHLET_ALPHA:g}, held-out test capped "
        f"at {size.max_eval}, max_length {size.max_length}; model: embedded all-MiniLM-L6-v2.",
        f"- variants: {'; '.join(f'{v}: ranks {list(r)} ({len(r)} clients)' for v, r in size.variants)}; every client "
        f"every round; LoRA alpha {ALPHA:g} (scale alpha/r) on query/value, classifier head trained and averaged.",
        f"- {size.rounds} rounds × {size.local_steps} local steps, batch {size.batch_size}, no DP; "
        f"seeds {list(size.seeds)}; mean ± std over seeds.",
        f"- {optimizer_note()}",
        "- slot norms: from the last checkpoint's widest downlink (the global adapter), Σ over modules of "
        "s·‖B[:, j]‖·‖A[j, :]‖. FLoRA has none (" + NOT_APPLICABLE.split(": ", 1)[1] + "). Nested FFA "
        "zero-pads B on purpose: A is shared and frozen, so a low-rank client's missing columns are genuine zeros "
        "and the product stays exact; its tail slots therefore shrink by c_j (B only), by design, not by c_j².",
        f"- {timing_note(size_name, records, size.estimate)}",
        "",
        "## Results",
        "",
        *md_variants,
        "## Plots",
        "",
        f"![accuracy per round]({png_acc.relative_to(out)})",
        "",
        f"![slot norms]({png_norms.relative_to(out)})",
        "",
    ]
    results = {
        "settings": {**size.__dict__, "optimizer": OPTIMIZER, "lora_alpha": ALPHA, "dirichlet_alpha": DIRICHLET_ALPHA},
        "variants": numbers,
        "runs": [r.to_json(out) for r in records],
    }
    return SuiteOutput(markdown="\n".join(md), results=results, run_log=cache.log)
