"""Suite `paper-rbla-scaling`: why RBLA loses to zero-padding in paper-rbla's text setting (issue 18).

The setting is paper-rbla's `mixed` variant (embedded MiniLM, rotten_tomatoes, 4 clients of ranks [2, 4, 8, 16],
Dirichlet α = 1, AdamW 5e-3), at a smaller size than paper-rbla's `full` (see SIZES). It measures:

1. every mixed-rank method under each LoRA scale rule (`lora.scaling` = alpha/r, rslora, constant; alpha chosen
   so that the widest client's scale is paper-rbla's 8/16 = 0.5 under every rule);
2. RBLA with slot shrinkage γ ∈ {0, 0.5, 1} (`strategy.options = {gamma = ...}`);
3. diagnostics of the final global adapter (fedlora.bench.rbla_diagnostics): held-out accuracy with the slots
   above k cut off, for k in the client ranks, and the share of held-out predictions per class;
4. placement: 4 equal-size clients with fixed label fractions, one of them very skewed; the top rank (16) goes to
   the most skewed client or to the most balanced one, the other ranks unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console

from fedlora.bench import plots
from fedlora.bench.common import OPTIMIZER, SuiteOutput, optimizer_note, optimizer_overrides, timing_note
from fedlora.bench.paper_rbla import DIRICHLET_ALPHA, rank_bands, slot_norms
from fedlora.bench.rbla_diagnostics import diagnose
from fedlora.bench.runs import RunCache, RunRecord, RunSpec
from fedlora.bench.tables import fmt_mean_std, md_table

NAME = "paper-rbla-scaling"
RANKS = (2, 4, 8, 16)
WIDEST_SCALE = 0.5  # paper-rbla's alpha 8 at rank 16 under alpha/r
# Label fractions (negative, positive) of 4 equal-size clients: one very skewed, one balanced, two moderate.
SKEWED, BALANCED = [0.05, 0.95], [0.5, 0.5]
MODERATE = ([0.7, 0.3], [0.35, 0.65])
# Client i gets rank RANKS[i] (ranks cycle over clients in order); only who holds rank 16 changes.
PLACEMENTS = {
    "top rank to the most skewed client": [BALANCED, *MODERATE, SKEWED],
    "top rank to the most balanced client": [SKEWED, *MODERATE, BALANCED],
}


def alpha_for(scaling: str, r_max: int = max(RANKS)) -> float:
    """alpha with s(r_max) = WIDEST_SCALE under each rule: the widest client is the same model under every rule;
    a rank-r client's scale is WIDEST_SCALE times r_max/r (alpha/r), sqrt(r_max/r) (rsLoRA) or 1 (constant)."""
    return WIDEST_SCALE * {"alpha/r": r_max, "rslora": r_max ** 0.5, "constant": 1.0}[scaling]


@dataclass(frozen=True)
class Size:
    seeds: tuple[int, ...]
    rounds: int
    local_steps: int
    max_eval: int
    max_length: int
    methods: tuple[str, ...]
    scalings: tuple[str, ...]
    gammas: tuple[float, ...]  # extra RBLA runs with these gammas (> 0), under `gamma_scalings`
    gamma_scalings: tuple[str, ...]
    placement_methods: tuple[str, ...]
    placement_scaling: str
    batch_size: int = 16
    estimate: str = ""


SIZES: dict[str, Size] = {
    # 45 runs of 4 clients x 3 rounds x 4 steps of 16 (paper-rbla full: 6 x 8 steps), max_length 32, held-out capped
    # at 200: about 25 s per run on one idle core, model loading included.
    "full": Size(seeds=(0, 1, 2), rounds=3, local_steps=4, max_eval=200, max_length=32,
                 methods=("rbla", "zeropad", "hetlora"), scalings=("alpha/r", "rslora", "constant"),
                 gammas=(0.5, 1.0), gamma_scalings=("alpha/r",),
                 placement_methods=("rbla", "zeropad"), placement_scaling="alpha/r",
                 estimate="about 20 min on one idle core (45 runs of about 25 s), plus about 8 min of diagnostics; "
                          "3-4x that on the busy machine it was measured on"),
    "quick": Size(seeds=(0,), rounds=2, local_steps=2, max_eval=100, max_length=32, methods=("rbla", "zeropad"),
                  scalings=("alpha/r", "constant"), gammas=(1.0,), gamma_scalings=("alpha/r",),
                  placement_methods=("rbla",), placement_scaling="alpha/r", estimate="about 5 min"),
    "smoke": Size(seeds=(0,), rounds=1, local_steps=1, max_eval=32, max_length=16, methods=("rbla",),
                  scalings=("constant",), gammas=(1.0,), gamma_scalings=("constant",), placement_methods=("rbla",),
                  placement_scaling="constant", estimate="about a minute (tests only)"),
}


def method_label(method: str, gamma: float) -> str:
    return method if not gamma else f"{method} γ={gamma:g}"


def _base(size: Size, scaling: str) -> list[str]:
    return [
        "data.name=rotten_tomatoes", f"data.max_length={size.max_length}", f"data.max_eval_examples={size.max_eval}",
        f"federation.num_clients={len(RANKS)}", f"federation.ranks={list(RANKS)}",
        f"federation.rounds={size.rounds}", f"federation.local_steps={size.local_steps}",
        f"federation.batch_size={size.batch_size}", f"lora.rank={max(RANKS)}",
        f"lora.scaling={scaling}", f"lora.alpha={alpha_for(scaling)}", "output.save_adapter=false",
        *optimizer_overrides(),
    ]


def _strategy(method: str, gamma: float) -> list[str]:
    return [f"strategy.name={method}"] + ([f"strategy.options={{gamma={gamma}}}"] if gamma else [])


def specs(size: Size) -> list[RunSpec]:
    out = []
    dirichlet = ["federation.partition=dirichlet", f"federation.alpha={DIRICHLET_ALPHA}"]
    runs = [(m, 0.0, sc) for sc in size.scalings for m in size.methods]
    runs += [("rbla", g, sc) for sc in size.gamma_scalings for g in size.gammas]
    for m, g, sc in runs:
        for seed in size.seeds:
            out.append(RunSpec(labels=(("part", "scaling"), ("scaling", sc), ("method", method_label(m, g))),
                               overrides=tuple(_base(size, sc) + dirichlet + _strategy(m, g)), seed=seed))
    for place, fractions in PLACEMENTS.items():
        rows = "[" + ",".join(f"[{a},{b}]" for a, b in fractions) + "]"
        for m in size.placement_methods:
            for seed in size.seeds:
                out.append(RunSpec(
                    labels=(("part", "placement"), ("placement", place), ("method", m)),
                    overrides=tuple(_base(size, size.placement_scaling) + _strategy(m, 0.0)
                                    + ["federation.partition=fractions", f"federation.label_fractions={rows}"]),
                    seed=seed))
    return out


def _fmt_cut(diags: list[dict]) -> list[str]:
    """Mean cut-off accuracy per client rank over the runs."""
    return [f"{np.mean([d['cutoff_accuracy'][str(k)] for d in diags]):.3f}" for k in RANKS]


def _pos_share(diags: list[dict]) -> str:
    """Share of held-out predictions in class 1 (positive), mean and range over seeds."""
    v = [d["pred_fractions"][1] for d in diags]
    return f"{np.mean(v):.2f} ({min(v):.2f}–{max(v):.2f})"


def run(out: Path, size_name: str, console: Console, jobs: int = 1) -> SuiteOutput:
    size = SIZES[size_name]
    cache = RunCache(out, console, NAME)
    records = cache.ensure_all(specs(size), jobs)
    # Diagnosed: RBLA (every gamma) and zero-padding, the pair in question (about 10 s a run).
    picked = [r for r in records if r.spec.label("method").split()[0] in ("rbla", "zeropad")]
    diags = diagnose([r.run_dir for r in picked], console)
    diag = {r.run_dir: diags.get(str(r.run_dir), {}) for r in records}
    bands = rank_bands(RANKS)
    numbers: dict = {"scaling": {}, "placement": {}}

    def acc(recs: list[RunRecord]) -> list[float]:
        return [r.summary["final_accuracy"] for r in recs]

    # 1+2: methods x scale rules, RBLA gammas
    sc_recs = [r for r in records if r.spec.label("part") == "scaling"]
    labels = list(dict.fromkeys(r.spec.label("method") for r in sc_recs))
    acc_rows, cut_rows, curves = [], [], {}
    for lab in labels:
        row = [lab]
        for sc in size.scalings:
            recs = [r for r in sc_recs if r.spec.label("method") == lab and r.spec.label("scaling") == sc]
            if not recs:
                row.append("–")
                continue
            ds = [diag[r.run_dir] for r in recs]
            norms = [slot_norms(r.run_dir, max(RANKS)) for r in recs]
            numbers["scaling"].setdefault(sc, {})[lab] = {
                "final_accuracy": acc(recs), "best_accuracy": [r.summary["best_accuracy"] for r in recs],
                "diagnostics": ds, "slot_norms": norms if norms[0] is not None else None}
            row.append(fmt_mean_std(acc(recs)))
            curves.setdefault(f"scale {sc}", {})[lab] = [r.accuracy_curve() for r in recs]
            if ds and ds[0]:
                band = ""
                if norms[0] is not None:
                    mean = np.mean(np.asarray(norms), axis=0)
                    per_band = [float(mean[lo - 1:hi].mean()) for lo, hi in bands]
                    band = f"{per_band[-1] / per_band[0]:.3g}" if per_band[0] > 0 else "nan"
                cut_rows.append([lab, sc, *_fmt_cut(ds), _pos_share(ds), band])
        acc_rows.append(row)
    majority = np.mean([r.summary["majority_accuracy"] for r in sc_recs])

    # 4: placement
    pl_recs = [r for r in records if r.spec.label("part") == "placement"]
    pl_rows = []
    for place in PLACEMENTS:
        for m in size.placement_methods:
            recs = [r for r in pl_recs if r.spec.label("placement") == place and r.spec.label("method") == m]
            ds = [diag[r.run_dir] for r in recs]
            numbers["placement"].setdefault(place, {})[m] = {"final_accuracy": acc(recs), "diagnostics": ds}
            pl_rows.append([place, m, fmt_mean_std(acc(recs)), *_fmt_cut(ds), _pos_share(ds)])
            curves.setdefault(place, {})[m] = [r.accuracy_curve() for r in recs]
    png = plots.plot_curves_with_band(curves, out / "plots" / "rbla_scaling_accuracy_vs_rounds.png")

    k_heads = [f"cut at {k}" for k in RANKS]
    md = [
        f"# {NAME}: RBLA against the other mixed-rank methods under each LoRA scale rule, with diagnostics",
        "",
        "## Protocol",
        "",
        f"- paper-rbla's `mixed` variant: rotten_tomatoes (embedded), {len(RANKS)} clients of ranks {list(RANKS)}, "
        f"Dirichlet label partition α = {DIRICHLET_ALPHA:g}, embedded all-MiniLM-L6-v2 with masked-mean pooling, "
        "LoRA on query/value, classifier head trained and averaged; every client every round.",
        f"- size `{size_name}` (smaller than paper-rbla's `full`, to fit the time this study had): {size.rounds} "
        f"rounds × {size.local_steps} local steps of {size.batch_size}, max_length {size.max_length}, held-out "
        f"capped at {size.max_eval} (majority class {majority:.3f}); seeds {list(size.seeds)}; mean ± std over "
        "seeds of the final-round accuracy.",
        f"- scale rules (`lora.scaling`): alpha chosen so that the rank-16 client's scale is {WIDEST_SCALE} under "
        f"every rule (alpha/r: alpha {alpha_for('alpha/r'):g}; rslora: {alpha_for('rslora'):g}; constant: "
        f"{alpha_for('constant'):g}); a rank-2 client's scale is then 4, 1.41 or 0.5. Every factor-averaging "
        "method averages B at the widest client's scale (B_k·s_k/s_g), so one slot means one ΔW on every client.",
        f"- {optimizer_note()}",
        "- diagnostics (fedlora.bench.rbla_diagnostics): from the last checkpoint's global adapter; `cut at k`: "
        "held-out accuracy with every slot above k removed (ΔW_k = s·B[:, :k]·A[:k], head unchanged); "
        "`positive share`: fraction of held-out predictions that are the positive class (mean, range over seeds); "
        "`tail/head`: mean slot norm of slots 9–16 over slots 1–2.",
        "- placement: 4 equal-size clients with label fractions (negative, positive) "
        f"{[BALANCED, *MODERATE, SKEWED]} in some order; ranks [2, 4, 8, 16] by client index; the rank-16 client "
        f"is the most skewed one ({SKEWED}) or the balanced one ({BALANCED}); scale {size.placement_scaling}.",
        f"- {timing_note(size_name, records, size.estimate)}",
        "",
        "## Final accuracy per scale rule",
        "",
        md_table(["method", *(f"scale {sc}" for sc in size.scalings)], acc_rows),
        "",
        "## Diagnostics of the final global adapter",
        "",
        md_table(["method", "scale", *k_heads, "positive share", "tail/head"], cut_rows),
        "",
        "## Placement: who holds the top rank",
        "",
        md_table(["placement", "method", "final accuracy", *k_heads, "positive share"], pl_rows),
        "",
        "## Plots",
        "",
        f"![accuracy per round]({png.relative_to(out)})",
        "",
    ]
    results = {"settings": {**size.__dict__, "ranks": RANKS, "optimizer": OPTIMIZER, "widest_scale": WIDEST_SCALE,
                            "alphas": {sc: alpha_for(sc) for sc in ("alpha/r", "rslora", "constant")},
                            "placements": PLACEMENTS, "dirichlet_alpha": DIRICHLET_ALPHA},
               "numbers": numbers, "runs": [r.to_json(out) for r in records]}
    return SuiteOutput(markdown="\n".join(md), results=results, run_log=cache.log)
