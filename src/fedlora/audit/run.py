"""`fedlora audit`: one audited run of a client-level DP experiment, canaries inserted, and what the final model
reveals about them set beside the accountant's epsilon (audit/report.md, audit/audit.json, audit/scores.png).

The audited run is the configured experiment with the canaries added as clients: num_clients = K + k inserted,
clients_per_round scaled to keep the sampling rate q, sigma as configured (or calibrated again to the same target
epsilon at that q); its accountant's epsilon is the one compared. Each of the N canaries is inserted on a fair
coin (the coins of Steinke et al.'s bound); the unseen ones are never sent to anyone. The canaries never touch
the real clients' data, and the audited run exports no adapter (it holds the canaries' changes).

Why the coins may decide the population: Steinke et al.'s theorem needs a mechanism that is DP in each coin.
Inserting canary i adds one client (independent Poisson sampling at rate q, the accountant's neighbouring
relation). It also moves the fixed divisor m = q(K + k) by q, which scales every release by a common factor;
the scores are cosines of the sum of releases, so they do not see it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedlora.api import as_config
from fedlora.audit.canaries import CanaryTransport, audited_parts, canary_scores
from fedlora.audit.stats import one_run_epsilon_lower_bound, one_shot_epsilon
from fedlora.config import ExperimentConfig
from fedlora.errors import UserError

THREAT_MODEL = ("client-level DP, adversary sees the final global model (and, for the all-iterates line, every "
                "round's global model); canary clients send a fixed direction of norm >> clip every round they are "
                "sampled (worst-case gradient canaries in the update space); the real clients train as configured")


@dataclass
class AuditResult:
    audit_dir: Path
    report: dict


def audited_config(cfg: ExperimentConfig, inserted: int) -> ExperimentConfig:
    """The experiment with `inserted` canary clients added, at the same client sampling rate."""
    if cfg.privacy.mode != "client":
        raise UserError("this audit measures client-level DP (privacy.mode=client); fedlora.audit.audit runs the "
                        "sample-level one for privacy.mode=sample")
    if cfg.privacy.secure_aggregation:
        raise UserError("fedlora audit runs without privacy.secure_aggregation (the released mechanism is the same; "
                        "tests/test_audit_mechanism.py audits SecAgg's arithmetic)")
    if cfg.engine != "local":
        raise UserError(f"fedlora audit runs on engine=local, not {cfg.engine}")
    fed = cfg.federation
    q = fed.per_round() / fed.num_clients
    total = fed.num_clients + inserted
    per_round = max(1, min(total, round(q * total)))
    tree = cfg.model_dump(exclude_none=True)
    tree["federation"].update(num_clients=total, clients_per_round=per_round,
                              min_clients=min(fed.min_clients, per_round))
    tree["output"].update(save_adapter=False)
    return as_config(tree)


def audit(config=None, *, overrides=(), canaries: int = 500, out: str | Path | None = None,
          confidence: float = 0.95, progress: bool = False) -> AuditResult:
    """Run the configured client-level DP experiment once with `canaries` canaries (each inserted on a fair coin)
    and write the audit next to the run (`out`/audit/). Returns the audit's folder and report."""
    from fedlora.engines.local import LocalTransport
    from fedlora.experiment import make_run_dir, prepare_data
    from fedlora.encoding import EncodedData
    from fedlora.federated_run import Run
    from fedlora.host import load_tokenizer
    from fedlora.metrics import read_metrics
    from fedlora.progress import RunProgress

    if canaries < 2:
        raise UserError(f"--canaries must be at least 2, got {canaries}")
    cfg = as_config(config, overrides)
    coins = np.random.default_rng([cfg.seed, 0xA0D17]).random(canaries) < 0.5
    index = np.flatnonzero(coins)  # canary i inserted as client K + its place among the inserted
    acfg = audited_config(cfg, len(index))
    t0 = time.perf_counter()
    data = prepare_data(cfg, load_tokenizer(cfg.model.name))  # the real clients' partitions, as a normal run
    empty = EncodedData(input_ids=[], labels=np.zeros(0, np.int64))
    data.clients = list(data.clients) + [empty] * len(index)
    run_dir = make_run_dir(acfg, str(out) if out else None)
    run = Run(acfg, run_dir, RunProgress(enabled=progress), data=data)
    transport = CanaryTransport(LocalTransport(run), cfg.federation.num_clients, cfg.seed,
                                audited_parts(run.strategy, acfg.federation.rounds), [int(i) for i in index])
    summary = run.loop(transport)
    refused = {c: why for row in read_metrics(run_dir) for c, why in (row.get("rejected") or {}).items()
               if int(c) >= cfg.federation.num_clients}
    if refused:  # the audit would measure canaries that never entered the mechanism
        c, why = next(iter(refused.items()))
        raise RuntimeError(f"the server rejected {len(refused)} canary updates (client {c}: {why})")
    final, best = canary_scores(transport.models, cfg.seed, canaries)
    report = summarize(acfg, summary, coins, final, best, transport.layout.dim, confidence,
                       time.perf_counter() - t0, len(transport.sampled), run.server.mechanism.sigma)
    write_audit(run_dir / "audit", report, final, coins, transport.layout.dim)
    return AuditResult(run_dir / "audit", report)


def summarize(cfg: ExperimentConfig, summary: dict, coins: np.ndarray, final: np.ndarray, best: np.ndarray,
              dim: int, confidence: float, seconds: float, ever_sampled: int, sigma: float) -> dict:
    """audit.json's content."""
    delta = cfg.privacy.delta
    unseen = final[~coins]
    return {
        "threat_model": THREAT_MODEL,
        "delta": delta,
        "epsilon_accountant": summary.get("final_epsilon"),
        "noise_multiplier": sigma,
        "rounds": cfg.federation.rounds,
        "sample_rate": cfg.federation.per_round() / cfg.federation.num_clients,
        "clip": cfg.privacy.clip,
        "canaries": {"total": int(len(coins)), "inserted": int(coins.sum()), "unseen": int((~coins).sum()),
                     "inserted_ever_sampled": ever_sampled, "dimension": dim},
        "epsilon_one_shot": one_shot_epsilon(final[coins], delta, dim=dim),
        "epsilon_one_shot_unseen_null": one_shot_epsilon(final[coins], delta, scores_out=unseen)
        if len(unseen) > 1 else None,
        "epsilon_lower_bound": one_run_epsilon_lower_bound(final, coins, delta, confidence),
        "epsilon_lower_bound_all_iterates": one_run_epsilon_lower_bound(best, coins, delta, confidence),
        "final_accuracy": summary.get("final_accuracy"),
        "seconds": round(seconds, 1),
    }


def format_number(x) -> str:
    """An audit figure for the report: n/a (None), inf, or 3 significant digits."""
    return "n/a" if x is None else ("inf" if isinstance(x, float) and math.isinf(x) else f"{x:.3g}")


def write_audit(folder: Path, report: dict, final: np.ndarray, coins: np.ndarray, dim: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "audit.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    lb, lb_all = report["epsilon_lower_bound"], report["epsilon_lower_bound_all_iterates"]
    one = report["epsilon_one_shot"]
    c = report["canaries"]
    lines = [
        "# Privacy audit (client-level DP)", "",
        f"Threat model: {report['threat_model']}.", "",
        "| quantity | epsilon |", "| --- | --- |",
        f"| accountant (delta = {report['delta']:g}) | {format_number(report['epsilon_accountant'])} |",
        f"| one-shot estimate (Andrew et al.; mu = {format_number(one['mu'])}) | {format_number(one['epsilon'])} |",
        f"| lower bound, final model ({lb['confidence']:.0%}, {lb['correct']}/{lb['guesses']} guesses right) "
        f"| {format_number(lb['epsilon'])} |",
        f"| lower bound, every round's model ({lb_all['correct']}/{lb_all['guesses']}) "
        f"| {format_number(lb_all['epsilon'])} |",
        "", f"Canaries: {c['total']} ({c['inserted']} inserted, {c['unseen']} unseen), {c['dimension']} coordinates; "
        f"sigma {format_number(report['noise_multiplier'])}, q {report['sample_rate']:.3g}, {report['rounds']} rounds, "
        f"clip {report['clip']:g}; {report['seconds']} s.", "",
        "A lower bound above the accountant's epsilon means the code leaks more than it claims (a bug). A lower "
        "bound below it proves nothing about the claim's tightness: one run with few guesses cannot certify a large "
        "epsilon. The one-shot estimate is an estimate, not a bound.", "",
        "![scores](scores.png)", ""]
    (folder / "report.md").write_text("\n".join(lines))
    plot_scores(folder / "scores.png", final, coins, dim)


def plot_scores(path: Path, final: np.ndarray, coins: np.ndarray, dim: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(min(final.min(), -4 / math.sqrt(dim)), max(final.max(), 4 / math.sqrt(dim)), 50)
    ax.hist(final[~coins], bins=bins, alpha=0.6, density=True, label="unseen canaries")
    ax.hist(final[coins], bins=bins, alpha=0.6, density=True, label="inserted canaries")
    x = np.linspace(bins[0], bins[-1], 400)
    ax.plot(x, np.sqrt(dim / (2 * np.pi)) * np.exp(-dim * x * x / 2), "k--", lw=1, label="null N(0, 1/d)")
    ax.set_xlabel("cos(theta_T - theta_0, c_i)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
