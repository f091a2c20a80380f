"""`fedlora audit privacy.mode=sample`: one audited run of a sample-level (DP-SGD) experiment, canaries in one
client's training, set beside that client's accountant epsilon (audit/report.md, audit/audit.json,
audit/scores.png).

The audited client is client 0: its DP-SGD carries N white-box gradient canaries (`gradient_canaries`) and its
data N' black-box input canaries (`input_canaries`: mislabelled held-out sentences for classification,
random-token sequences for the causal LM), each inserted on a fair coin of its own; the other clients train as
configured. Sample-level DP is each client's guarantee about its own examples, so the epsilon compared is client
0's accountant's (the run's reported epsilon is the largest over clients).
The audited run exports no adapter (it holds the canaries); a normal run never builds any of this.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from fedlora.api import as_config
from fedlora.audit.gradient_canaries import AuditedSamplePrivacy, GradientCanaries
from fedlora.audit.input_canaries import (global_losses, mislabelled, random_token_canaries, unused_held_out,
                                          with_examples)
from fedlora.audit.run import AuditResult, format_number
from fedlora.audit.stats import one_run_epsilon_lower_bound, one_shot_epsilon
from fedlora.config import ExperimentConfig
from fedlora.errors import UserError

AUDITED_CLIENT = 0
WHITE_BOX = ("sample-level DP of client 0's DP-SGD; white-box: the adversary sees the noisy summed gradient of "
             "every step client 0 takes, and knows every example but the canaries (so it subtracts the real "
             "examples' clipped sum); gradient canaries contribute a fixed direction of the clip's norm (per "
             "clipping group) when Poisson-sampled at the client's rate q")
BLACK_BOX = ("sample-level DP of client 0; black-box: the adversary sees the initial and the final global model "
             "and scores each {what} by its loss drop (weak: far from a worst-case example)")
CANARY_KIND = {"classification": "mislabelled sentence", "causal-lm": "random-token sequence (loss on its response)"}


def audited_config(cfg: ExperimentConfig) -> ExperimentConfig:
    if cfg.privacy.mode != "sample":
        raise UserError("the sample-level audit needs privacy.mode=sample")
    if cfg.engine != "local":
        raise UserError(f"fedlora audit runs on engine=local, not {cfg.engine}")
    tree = cfg.model_dump(exclude_none=True)
    tree["output"].update(save_adapter=False)
    return as_config(tree)


def input_canaries(cfg: ExperimentConfig, tokenizer, data, count: int):
    """(black-box canaries, None), or (None, why there are none): `count` random-token sequences for the causal
    LM; for classification, mislabelled held-out sentences (up to `count`, as many as the evaluation leaves)."""
    from fedlora.experiment import prepare_data

    if cfg.task == "causal-lm":
        return random_token_canaries(tokenizer, count, cfg.seed, cfg.data.max_length), None
    if cfg.task != "classification":
        return None, f"black-box input canaries are built for classification and causal-lm, not task={cfg.task}"
    tree = cfg.model_dump(exclude_none=True)
    tree["data"].pop("max_eval_examples", None)
    pool = unused_held_out(prepare_data(as_config(tree), tokenizer).test, data.test)
    if len(pool) < 2:
        return None, "no held-out sentence is left outside the evaluation set for black-box canaries"
    return mislabelled(pool, min(count, len(pool)), len(data.label_names), cfg.seed), None


def fair_coins(seed: int, white: int, black: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Each canary's own fair coin (True: inserted), white-box then black-box, deterministic in `seed`."""
    rng = np.random.default_rng([seed, 0xA0D18])
    return rng.random(white) < 0.5, (rng.random(black) < 0.5 if black is not None else None)


def audit_sample(config=None, *, overrides=(), canaries: int = 500, out: str | Path | None = None,
                 confidence: float = 0.95, progress: bool = False) -> AuditResult:
    """Run the configured sample-level DP experiment once with `canaries` white-box canaries (and as many
    black-box ones; for classification up to the unused held-out sentences) in client 0, each on a fair coin;
    write the audit next to the run (`out`/audit/)."""
    from fedlora.engines.local import LocalTransport
    from fedlora.experiment import make_run_dir, prepare_data
    from fedlora.federated_run import Run
    from fedlora.host import load_tokenizer
    from fedlora.metrics import read_metrics
    from fedlora.progress import RunProgress

    if canaries < 2:
        raise UserError(f"--canaries must be at least 2, got {canaries}")
    cfg = audited_config(as_config(config, overrides))
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model.name)
    data = prepare_data(cfg, tokenizer)
    inputs, black_note = input_canaries(cfg, tokenizer, data, canaries)
    white_coins, black_coins = fair_coins(cfg.seed, canaries, len(inputs) if inputs is not None else None)
    if inputs is not None:
        inserted = inputs.subset(np.flatnonzero(black_coins))
        data.clients[AUDITED_CLIENT] = with_examples(data.clients[AUDITED_CLIENT], inserted)
    run = Run(cfg, make_run_dir(cfg, str(out) if out else None), RunProgress(enabled=progress), data=data)
    transport = LocalTransport(run)
    gradient = GradientCanaries(white_coins, cfg.seed)
    audited = AuditedSamplePrivacy.of(transport.client_privacy[AUDITED_CLIENT], gradient)
    transport.client_privacy[AUDITED_CLIENT] = audited
    before = global_losses(run, inputs) if inputs is not None else None
    summary = run.loop(transport)
    refused = [row["rejected"][k] for row in read_metrics(run.run_dir) for k in (row.get("rejected") or {})
               if int(k) == AUDITED_CLIENT]
    if refused:  # its steps still happened, but the black-box canaries would be scored on a model without them
        raise RuntimeError(f"the server rejected the audited client's update: {refused[0]}")
    drop = before - global_losses(run, inputs) if inputs is not None else None
    report = {
        "threat_model": WHITE_BOX,
        "delta": cfg.privacy.delta,
        "epsilon_accountant": audited.epsilon(),
        "epsilon_accountant_run": summary.get("final_epsilon"),
        "noise_multiplier": audited.noise_multiplier,
        "sample_rate": audited.sample_rate,
        "dp_steps": audited.accountant.total_steps,
        "clip": cfg.privacy.clip,
        "clipping": cfg.privacy.clipping,
        "lora_clip": cfg.privacy.lora_clip if cfg.privacy.clipping == "group" else None,
        "white_box": scored(gradient.scores, white_coins, cfg.privacy.delta, confidence,
                            ever_sampled=gradient.ever_sampled(), steps=gradient.steps,
                            epsilon_lower_bound_raw=one_run_epsilon_lower_bound(
                                gradient.scores_raw, white_coins, cfg.privacy.delta, confidence)),
        "black_box": {"threat_model": BLACK_BOX.format(what=CANARY_KIND[cfg.task]),
                      **scored(drop, black_coins, cfg.privacy.delta, confidence)}
        if drop is not None else {"skipped": black_note},
        "final_accuracy": summary.get("final_accuracy"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_audit(run.run_dir / "audit", report, gradient.scores, white_coins, drop, black_coins)
    return AuditResult(run.run_dir / "audit", report)


def scored(scores: np.ndarray, coins: np.ndarray, delta: float, confidence: float, **extra) -> dict:
    """One kind of canary's counts, one-shot estimate (inserted vs. not-inserted fits) and one-run bound."""
    return {
        "canaries": {"total": int(len(coins)), "inserted": int(coins.sum()), "unseen": int((~coins).sum())},
        "epsilon_one_shot": one_shot_epsilon(scores[coins], delta, scores_out=scores[~coins]),
        "epsilon_lower_bound": one_run_epsilon_lower_bound(scores, coins, delta, confidence),
        **extra,
    }


def _rows(name: str, part: dict) -> list[str]:
    lb, one = part["epsilon_lower_bound"], part["epsilon_one_shot"]
    c = part["canaries"]
    rows = [f"| {name}: one-shot estimate (mu = {format_number(one['mu'])}) | {format_number(one['epsilon'])} |",
            f"| {name}: lower bound ({lb['confidence']:.0%}, {lb['correct']}/{lb['guesses']} guesses right, "
            f"{c['inserted']} of {c['total']} canaries inserted) | {format_number(lb['epsilon'])} |"]
    if "epsilon_lower_bound_raw" in part:
        raw = part["epsilon_lower_bound_raw"]
        rows.append(f"| {name}: lower bound, noisy gradients alone ({raw['correct']}/{raw['guesses']}) "
                    f"| {format_number(raw['epsilon'])} |")
    return rows


def write_audit(folder: Path, report: dict, white: np.ndarray, white_coins: np.ndarray, drop, black_coins) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "audit.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    w, b = report["white_box"], report["black_box"]
    lines = ["# Privacy audit (sample-level DP, client 0)", "",
             f"White-box threat model: {report['threat_model']}.", "",
             "| quantity | epsilon |", "| --- | --- |",
             f"| accountant, client 0 (delta = {report['delta']:g}) | {format_number(report['epsilon_accountant'])} |",
             *_rows("white-box", w)]
    lines += _rows("black-box", b) if "skipped" not in b else []
    lines += ["", f"sigma {format_number(report['noise_multiplier'])}, q {report['sample_rate']:.3g}, "
              f"{report['dp_steps']} "
              f"DP steps of client 0 ({w['ever_sampled']} inserted white-box canaries sampled at least once); "
              f"{report['seconds']} s.", ""]
    lines += [f"Black-box: {b['skipped']}." if "skipped" in b else f"Black-box threat model: {b['threat_model']}.", ""]
    lines += ["A lower bound above the accountant's epsilon means the code leaks more than it claims (a bug). A lower "
              "bound below it proves nothing about the claim's tightness: one run with few guesses cannot certify a "
              "large epsilon. The one-shot estimate is an estimate, not a bound.", "", "![scores](scores.png)", ""]
    (folder / "report.md").write_text("\n".join(lines))
    plot_scores(folder / "scores.png", [("white-box: sum of projections", white, white_coins)]
                + ([("black-box: loss drop", drop, black_coins)] if drop is not None else []))


def plot_scores(path: Path, panels: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (label, scores, coins) in zip(axes[0], panels):
        bins = np.linspace(scores.min(), scores.max() + 1e-12, 50)
        ax.hist(scores[~coins], bins=bins, alpha=0.6, density=True, label="not inserted")
        ax.hist(scores[coins], bins=bins, alpha=0.6, density=True, label="inserted")
        ax.set_xlabel(label)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("density")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
