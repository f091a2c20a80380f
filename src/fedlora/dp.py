"""Privacy as a run uses it: one `PrivacyMechanism` per mode (`privacy.mode`), each with a client side (the
client's DP state for training) and a server side (client sampling, checks of what clients report, a wrapper
around aggregation, accounting, metrics). Nothing else in fedlora branches on the privacy mode.

- "none": no privacy; aggregation weights are the clients' example counts (robust options apply).
- "sample": DP-SGD on every client (`SamplePrivacy`): sigma calibrated once per client from the target epsilon
  and every local step it may take over all rounds, one accountant per client for the whole run, budget
  enforced. Aggregation is post-processing.
- "client": DP-FedAvg on the server (`ClientLevelDP`): Poisson client sampling, each client's change clipped to
  S in the coordinates it enters the aggregate with, Gaussian noise, one accountant for the federation.

The math lives in `fedlora.privacy` (Opacus accountants, per-example clipping, client clipping and noise).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch

from fedlora.config import ExperimentConfig
from fedlora.privacy import (
    ClientAccountant,
    calibrate_noise_multiplier,
    noise_only_step,
    poisson_batches,
    private_training,
    would_exceed,
)
from fedlora.privacy.client_dp import clip_update, gaussian_noise
from fedlora.strategies import LoraFactors


@dataclass
class SamplePrivacy:
    """One client's sample-level DP-SGD state. Lives as long as the run (and in checkpoints)."""

    noise_multiplier: float
    sample_rate: float
    clip: float
    delta: float
    target_epsilon: float | None
    accountant: ClientAccountant

    @classmethod
    def for_client(cls, cfg: ExperimentConfig, num_examples: int) -> "SamplePrivacy":
        p, fed = cfg.privacy, cfg.federation
        q = min(1.0, cfg.local_batch_size() / max(num_examples, 1))
        sigma = p.noise_multiplier
        if sigma is None:
            # Calibrated once for every local step this client may take in the whole run (all rounds).
            sigma = calibrate_noise_multiplier(p.epsilon, p.delta, q, fed.rounds * cfg.local_steps(), p.accountant)
        return cls(sigma, q, p.clip, p.delta, p.epsilon, ClientAccountant(p.accountant))

    def epsilon(self) -> float:
        return self.accountant.epsilon(self.delta)

    def can_train(self, steps: int) -> bool:
        """False when the next round's steps would push epsilon past the target (the client sits out)."""
        if self.target_epsilon is None:
            return True
        return not would_exceed(self.accountant, self.noise_multiplier, self.sample_rate, steps, self.delta,
                                self.target_epsilon)

    def report(self) -> dict:
        return {
            "epsilon": self.epsilon(),
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "dp_steps": self.accountant.total_steps,
            "accountant": self.accountant.state_dict(),
        }

    def state_dict(self) -> dict:
        return {"noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate, "clip": self.clip,
                "delta": self.delta, "target_epsilon": self.target_epsilon,
                "accountant": self.accountant.state_dict()}

    @classmethod
    def from_state_dict(cls, d: dict) -> "SamplePrivacy":
        return cls(d["noise_multiplier"], d["sample_rate"], d["clip"], d["delta"], d["target_epsilon"],
                   ClientAccountant.from_state_dict(d["accountant"]))

    @contextmanager
    def session(self, cfg: ExperimentConfig, model, optimizer, n: int, rng: np.random.Generator, round_idx: int,
                client_id: int):
        """This client's DP-SGD session for one round: Poisson batches (q = expected batch / n), Opacus'
        per-example clipping and Gaussian noise, and its accountant charged for every step taken."""
        from fedlora.client import TrainingSession

        batches = poisson_batches(n, self.sample_rate, cfg.local_steps(), rng)
        seed = np.random.SeedSequence([cfg.seed, round_idx, client_id, 7]).generate_state(1)[0]
        with private_training(
            model, optimizer, noise_multiplier=self.noise_multiplier, clip=self.clip,
            expected_batch_size=cfg.local_batch_size(),
            generator=torch.Generator(device=next(model.parameters()).device).manual_seed(int(seed)),
            accountant=self.accountant, sample_rate=self.sample_rate, clip_groups=clip_groups(cfg, model),
        ) as (module, dp_optimizer):
            session = TrainingSession(module, dp_optimizer, batches, set_to_none=False)

            def empty_step() -> None:
                noise_only_step(dp_optimizer)
                dp_optimizer.zero_grad()

            session.empty_step = empty_step
            yield session


def clip_groups(cfg: ExperimentConfig, model: torch.nn.Module) -> list[tuple[list, float]] | None:
    """privacy.clipping = "group": [(LoRA factors, lora_clip), (classifier head, clip)]; None for flat clipping."""
    if cfg.privacy.clipping != "group":
        return None
    head, factors = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (head if ".modules_to_save." in name else factors).append(p)
    groups = [(factors, cfg.privacy.lora_clip), (head, cfg.privacy.clip)]
    return [(params, bound) for params, bound in groups if params]


def client_level_calibration(cfg: ExperimentConfig) -> tuple[float, float]:
    """(sigma, q) for DP-FedAvg: Poisson rate q = clients_per_round / num_clients, one step per round."""
    p, fed = cfg.privacy, cfg.federation
    q = fed.per_round() / fed.num_clients
    sigma = p.noise_multiplier
    if sigma is None:
        sigma = calibrate_noise_multiplier(p.epsilon, p.delta, q, fed.rounds, p.accountant)
    return float(sigma), q


def max_epsilon(reports: dict[int, dict]) -> tuple[int, dict] | None:
    """The client with the largest epsilon so far and its report."""
    if not reports:
        return None
    cid = max(reports, key=lambda c: (reports[c]["epsilon"] if math.isfinite(reports[c]["epsilon"]) else math.inf))
    return cid, reports[cid]


def privacy_metrics(cfg: ExperimentConfig, reports: dict[int, dict]) -> dict:
    """The DP columns of a metrics row: epsilon is the max over clients, with that client's sigma, q, steps."""
    if cfg.privacy.mode == "none":
        return {}
    top = max_epsilon(reports)
    if top is None:
        return {"epsilon": 0.0, "delta": cfg.privacy.delta, "accountant": cfg.privacy.accountant, "privacy": cfg.privacy.mode}
    cid, rep = top
    return {
        "epsilon": rep["epsilon"],
        "delta": cfg.privacy.delta,
        "noise_multiplier": rep["noise_multiplier"],
        "sample_rate": rep["sample_rate"],
        "dp_steps": rep["dp_steps"],
        "dp_steps_max": max(r["dp_steps"] for r in reports.values()),
        "epsilon_client": cid,
        "accountant": cfg.privacy.accountant,
        "privacy": cfg.privacy.mode,
    }


# -- what clients send, as flat arrays ---------------------------------------------------------------------------
def sent_tensors(strategy, parts, factors: dict[str, LoraFactors], head: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays a client puts on the wire, flat by "<module>.<part>" and "head.<name>" (FFA: B and head)."""
    out = {}
    for name, f in factors.items():
        for part, arr in strategy.to_parts(name, f, parts).items():
            out[f"{name}.{part}"] = np.asarray(arr, np.float64)
    for name, h in head.items():
        out[f"head.{name}"] = np.asarray(h, np.float64)
    return out


def from_sent(strategy, parts, tensors: dict[str, np.ndarray], like: dict[str, LoraFactors],
              head_like: dict[str, np.ndarray]) -> tuple[dict[str, LoraFactors], dict[str, np.ndarray]]:
    """Factors and head back from `sent_tensors` arrays (the parts not sent are kept from `like`)."""
    factors = {n: strategy.from_parts(n, {p: tensors[f"{n}.{p}"] for p in parts}, f) for n, f in like.items()}
    return factors, {n: tensors[f"head.{n}"].astype(np.float32) for n in head_like}


# -- mechanisms --------------------------------------------------------------------------------------------------
class PrivacyMechanism:
    """No privacy. The base of every mode: each hook is a no-op here."""

    mode = "none"
    client_reports = False  # clients send a privacy report (their own accountant) with each update

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg

    # client side
    @classmethod
    def client_state(cls, cfg: ExperimentConfig, num_examples: int) -> "SamplePrivacy | None":
        """The DP state one client trains with (kept by whoever hosts the client, across rounds)."""
        return None

    # server side
    def sample_clients(self, server, rng: np.random.Generator) -> list[int] | None:
        """This round's clients, when the mechanism's analysis needs its own sampling; None: the default."""
        return None

    def check_report(self, server, update) -> str | None:
        """Why the privacy report a client sent must be rejected, or None."""
        return None

    def prepare(self, server, updates: list) -> tuple[list, list[float], dict]:
        """(updates to aggregate, their weights, extra metrics): the wrapper around the strategy's aggregate."""
        weights = [float(u.num_examples) for u in updates]
        rule = self.cfg.federation.aggregation
        if rule != "mean" and len(updates) > 1:
            return [robust_center(server, updates, rule, self.cfg.federation.trim_fraction)], [1.0], {
                "aggregation": rule}
        return updates, weights, {}

    def after_round(self, server, updates: list) -> None:
        """Accounting once the round's updates are aggregated."""

    def metrics(self, server) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


class SampleLevelDP(PrivacyMechanism):
    """DP-SGD on every client; the server keeps each client's last report (epsilon, accountant state)."""

    mode = "sample"
    client_reports = True

    @classmethod
    def client_state(cls, cfg: ExperimentConfig, num_examples: int) -> "SamplePrivacy":
        return SamplePrivacy.for_client(cfg, num_examples)

    def check_report(self, server, update) -> str | None:
        return check_privacy_report(update.privacy, server.privacy.get(update.client_id))

    def after_round(self, server, updates: list) -> None:
        for u in updates:
            server.privacy[u.client_id] = u.privacy

    def metrics(self, server) -> dict:
        return privacy_metrics(self.cfg, server.privacy)


class ClientLevelDP(PrivacyMechanism):
    """DP-FedAvg (McMahan et al. 2018) on what clients send.

    - Sampling: each client joins a round independently with probability q = clients_per_round / num_clients
      (Poisson), the model the subsampled-Gaussian accountant analyses.
    - Clipping: a client's change (sent tensors minus its downlink) is clipped to S *in the coordinates it
      enters the aggregate with*: the strategy's `contribution_scales` (FFA with mixed ranks: s_k / s_g).
    - Noise, linear methods: N(0, sigma^2 S^2) once on the sum, and the sum is divided by the fixed expected
      number of clients m = q·K, not by the number of replies (the sensitivity of sum/m is S/m whatever the
      round's size). Other methods read clients individually: each clipped update gets N(0, sigma^2 S^2).
    - Accounting: every client is charged every round (q covers it); their histories are identical, so one
      accountant serves the federation and epsilon is computed once per round.
    """

    mode = "client"

    def __init__(self, cfg: ExperimentConfig):
        super().__init__(cfg)
        self.sigma, self.q = client_level_calibration(cfg)
        self.accountant = ClientAccountant(cfg.privacy.accountant)
        self.report: dict | None = None

    def sample_clients(self, server, rng: np.random.Generator) -> list[int]:
        return [int(c) for c in np.flatnonzero(rng.random(self.cfg.federation.num_clients) < self.q)]

    def expected_clients(self) -> float:
        return self.q * self.cfg.federation.num_clients

    def prepare(self, server, updates: list) -> tuple[list, list[float], dict]:
        clip, sigma = self.cfg.privacy.clip, self.sigma
        strategy, parts = server.strategy, server.up_parts()
        rng = np.random.default_rng([self.cfg.seed, server.round + 1, 99])
        linear = strategy.linear
        f = [1.0] * len(updates)
        if linear:
            f = strategy.contribution_scales([u.rank for u in updates], [self.cfg.lora.scale(u.rank) for u in updates])
        spread = self._spread(server, updates) if linear else None
        noisy_at = max(range(len(updates)), key=lambda i: updates[i].rank) if linear else None
        out, norms = [], {}
        for i, u in enumerate(updates):
            ref_factors, ref_head = server.reference(u)  # what this client was sent, at its rank
            now, ref = sent_tensors(strategy, parts, u.factors, u.head), sent_tensors(strategy, parts, ref_factors, ref_head)
            # The contribution: the change in the aggregate's coordinates (the head is averaged as sent).
            # B enters scaled by f (at the aggregate's one scale); A, R and the head enter as sent.
            weight = {k: f[i] if k.endswith(".B") and not k.startswith("head.") else 1.0 for k in now}
            clipped, norms[u.client_id] = clip_update({k: (now[k] - ref[k]) * weight[k] for k in now}, clip)
            if i == noisy_at or not linear:
                clipped = gaussian_noise(clipped, sigma * clip, rng)
            if linear:  # the strategy's mean over the round's D_j replies becomes the noisy sum over m_j
                clipped = {k: v * spread(k, v.shape) for k, v in clipped.items()}
            factors, head = from_sent(strategy, parts, {k: ref[k] + clipped[k] / weight[k] for k in now}, u.factors,
                                      u.head)
            out.append(replace(u, factors=factors, head=head))
        extra = {"clip_norms": {str(k): v for k, v in norms.items()},
                 "noise_placement": "sum" if linear else "each", "expected_clients": self.expected_clients()}
        return out, [1.0] * len(updates), extra  # data-size weights would let one influence exceed the clip

    def _spread(self, server, updates: list):
        """(name, shape) -> D_j / m_j per slot: D_j the clients the strategy averages slot j over this round,
        m_j its fixed expected number (q times the clients that hold slot j; all of them without per-slot
        means). Dividing the sum by m_j, not D_j, keeps the sensitivity S / m_j whatever the round's size."""
        n = len(updates)
        if not server.strategy.per_slot_mean:
            ratio = n / self.expected_clients()
            return lambda name, shape: ratio
        width = max(server.client_ranks + [u.rank for u in updates])
        ranks_all = np.asarray(server.client_ranks)
        ranks_round = np.asarray([u.rank for u in updates])
        slots = np.arange(width)
        held = (ranks_round[None, :] > slots[:, None]).sum(axis=1)  # D_j
        expected = self.q * (ranks_all[None, :] > slots[:, None]).sum(axis=1)  # m_j
        per_slot = np.where(expected > 0, held / np.maximum(expected, 1e-300), 0.0)
        ratio = n / self.expected_clients()

        def spread(name: str, shape: tuple) -> np.ndarray | float:
            if name.startswith("head."):
                return ratio
            r = shape[1] if name.endswith(".B") else shape[0]
            return per_slot[:r][None, :] if name.endswith(".B") else per_slot[:r][:, None]

        return spread

    def after_round(self, server, updates: list) -> None:
        p = self.cfg.privacy
        self.accountant.step(self.sigma, self.q, 1)
        self.report = {"epsilon": self.accountant.epsilon(p.delta), "noise_multiplier": self.sigma,
                       "sample_rate": self.q, "dp_steps": self.accountant.total_steps}

    def metrics(self, server) -> dict:
        p = self.cfg.privacy
        out = {"delta": p.delta, "accountant": p.accountant, "privacy": self.mode}
        if self.report is None:
            return {"epsilon": 0.0, **out}
        return {**self.report, "dp_steps_max": self.report["dp_steps"], **out}

    def state_dict(self) -> dict:
        return {"accountant": self.accountant.state_dict(), "report": self.report}

    def load_state_dict(self, state: dict) -> None:
        if "accountant" in state:
            self.accountant = ClientAccountant.from_state_dict(state["accountant"])
            self.report = state.get("report")


MECHANISMS: dict[str, type[PrivacyMechanism]] = {"none": PrivacyMechanism, "sample": SampleLevelDP,
                                                  "client": ClientLevelDP}


def make_mechanism(cfg: ExperimentConfig) -> PrivacyMechanism:
    return MECHANISMS[cfg.privacy.mode](cfg)


# -- robust aggregation -------------------------------------------------------------------------------------------
def robust_center(server, updates: list, rule: str, trim: float):
    """One update whose sent tensors are the coordinate-wise median (or trimmed mean) of the clients'.

    Only for linear methods with one rank (checked in the config): their aggregate of one update is that
    update, so aggregating the center gives the robust aggregate. Weights are ignored (as in the robust
    statistics literature: a weight is as untrusted as the values).
    """
    strategy, parts = server.strategy, server.up_parts()
    tensors = [sent_tensors(strategy, parts, u.factors, u.head) for u in updates]
    center = {}
    for k in tensors[0]:
        stack = np.stack([t[k] for t in tensors])
        if rule == "median":
            center[k] = np.median(stack, axis=0)
        else:
            cut = int(math.floor(trim * len(updates)))
            ordered = np.sort(stack, axis=0)
            center[k] = ordered[cut: len(updates) - cut].mean(axis=0)
    factors, head = from_sent(strategy, parts, center, updates[0].factors, updates[0].head)
    return replace(updates[0], factors=factors, head=head)


# -- reports clients send -----------------------------------------------------------------------------------------
MAX_HISTORY = 100_000  # accountant history entries a report may carry


def check_privacy_report(report, previous: dict | None) -> str | None:
    """Why a client's sample-level DP report is malformed, or None. Its numbers are logged as the client's
    epsilon: they must be finite, typed and consistent with its accountant state."""
    if not isinstance(report, dict):
        return "privacy report missing or not an object"
    try:
        eps, sigma, q, steps = (report[k] for k in ("epsilon", "noise_multiplier", "sample_rate", "dp_steps"))
        acc = report["accountant"]
    except KeyError as exc:
        return f"privacy report lacks {exc}"
    for name, x in (("epsilon", eps), ("noise_multiplier", sigma), ("sample_rate", q)):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
            return f"privacy report: {name} {x!r} is not a finite number >= 0"
    if not 0 < q <= 1:
        return f"privacy report: sample_rate {q!r} outside (0, 1]"
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= 10**9:
        return f"privacy report: dp_steps {steps!r} is not an integer in 0..1e9"
    if not isinstance(acc, dict) or not isinstance(acc.get("history"), list) or len(acc["history"]) > MAX_HISTORY:
        return "privacy report: malformed accountant state"
    try:
        accountant = ClientAccountant.from_state_dict(acc)
        if accountant.total_steps != steps:
            return f"privacy report: dp_steps {steps} differs from its accountant's {accountant.total_steps}"
    except (ValueError, TypeError, OverflowError):
        return "privacy report: malformed accountant state"
    if previous is not None and steps < previous.get("dp_steps", 0):
        return f"privacy report: dp_steps went back from {previous['dp_steps']} to {steps}"
    return None
