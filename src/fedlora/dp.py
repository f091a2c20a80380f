"""Privacy as a run uses it: per-client DP-SGD state (sample level) and the server's client-level mechanism.

The math lives in `fedlora.privacy` (Opacus accountants, per-example clipping, noise); this module binds it
to the config and the round loop: sigma calibrated once per client from the target epsilon and the total
number of local steps over all rounds, one accountant per client for the whole run, budget enforced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fedlora.config import ExperimentConfig
from fedlora.privacy import (
    ClientAccountant,
    calibrate_noise_multiplier,
    clip_update,
    noise_only_step,
    poisson_batches,
    private_training,
    would_exceed,
)
from fedlora.strategies import LoraFactors, Strategy


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

    def train(self, model, optimizer, data, trainer, rng: np.random.Generator, round_idx: int, client_id: int):
        """Local DP-SGD: Poisson batches, per-example clipping and Gaussian noise (Opacus); returns (losses, samples)."""
        from fedlora.client import collate

        cfg = trainer.cfg
        batches = poisson_batches(len(data), self.sample_rate, cfg.local_steps(), rng)
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, round_idx, client_id, 7]).generate_state(1)[0]))
        losses, samples = [], 0
        with private_training(
            model, optimizer, noise_multiplier=self.noise_multiplier, clip=self.clip,
            expected_batch_size=cfg.local_batch_size(), generator=gen,
            accountant=self.accountant, sample_rate=self.sample_rate, clip_groups=clip_groups(cfg, model),
        ) as (module, dp_optimizer):
            for idx in batches:
                if len(idx) == 0:
                    noise_only_step(dp_optimizer)  # an empty Poisson batch still takes a (noise-only) step
                    dp_optimizer.zero_grad()
                    continue
                loss = module(**collate(data, idx, trainer.pad_id)).loss
                loss.backward()
                dp_optimizer.step()
                dp_optimizer.zero_grad()
                losses.append(float(loss.detach()))
                samples += len(idx)
        return losses, samples


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


def sent_tensors(update_factors: dict[str, LoraFactors], head: dict[str, np.ndarray], sends_A: bool) -> dict[str, np.ndarray]:
    """The arrays a client puts on the wire, flat by name (FFA: B and head only)."""
    out = {}
    for name, f in update_factors.items():
        out[f"{name}.B"] = np.asarray(f.B, np.float64)
        if sends_A:
            out[f"{name}.A"] = np.asarray(f.A, np.float64)
    for name, h in head.items():
        out[f"head.{name}"] = np.asarray(h, np.float64)
    return out


def clip_client_update(
    factors: dict[str, LoraFactors], head: dict[str, np.ndarray],
    ref_factors: dict[str, LoraFactors], ref_head: dict[str, np.ndarray], clip: float, sends_A: bool,
) -> tuple[dict[str, LoraFactors], dict[str, np.ndarray], float]:
    """Clip what a client changed (its sent tensors minus the downlink it got) to L2 norm `clip`.

    Returns the clipped factors and head (reference + clipped change) and the norm before clipping.
    """
    ref = {n: LoraFactors(A=f.A[: factors[n].rank], B=f.B[:, : factors[n].rank], scale=f.scale)
           for n, f in ref_factors.items()}
    now, before = sent_tensors(factors, head, sends_A), sent_tensors(ref, ref_head, sends_A)
    clipped, norm = clip_update({k: now[k] - before[k] for k in now}, clip)
    new = {k: before[k] + clipped[k] for k in now}
    out_factors = {
        n: LoraFactors(A=new[f"{n}.A"] if sends_A else f.A, B=new[f"{n}.B"], scale=f.scale)
        for n, f in factors.items()
    }
    out_head = {n: new[f"head.{n}"].astype(np.float32) for n in head}
    return out_factors, out_head, norm


def add_noise(factors: dict[str, LoraFactors], head: dict[str, np.ndarray], std: float, sends_A: bool,
              rng: np.random.Generator) -> tuple[dict[str, LoraFactors], dict[str, np.ndarray]]:
    """Gaussian noise on every sent coordinate (factors not sent, e.g. FFA's A, stay exact)."""
    noisy = {}
    for n, f in factors.items():
        B = f.B + rng.normal(0.0, std, f.B.shape)
        A = f.A + rng.normal(0.0, std, f.A.shape) if sends_A else f.A
        noisy[n] = LoraFactors(A=A, B=B, scale=f.scale)
    return noisy, {n: h + rng.normal(0.0, std, h.shape).astype(h.dtype) for n, h in head.items()}


def client_level_calibration(cfg: ExperimentConfig) -> tuple[float, float]:
    """(sigma, q) for DP-FedAvg: q = clients per round / clients, one step per round over all rounds."""
    p, fed = cfg.privacy, cfg.federation
    q = fed.per_round() / fed.num_clients
    sigma = p.noise_multiplier
    if sigma is None:
        sigma = calibrate_noise_multiplier(p.epsilon, p.delta, q, fed.rounds, p.accountant)
    return float(sigma), q


def noise_placement(strategy: Strategy) -> str:
    """Where client-level noise goes. Linear methods: once, on the sum (the central DP-FedAvg mechanism).

    Methods that read each client's factors individually (products, SVD, stacking, norm weights) cannot be
    protected by noise on a sum they never form; each clipped update gets the full N(0, sigma^2 S^2) instead,
    which is the same per-client guarantee (every release is a Gaussian mechanism of sensitivity S) with more
    noise in the aggregate.
    """
    return "sum" if strategy.linear else "each"


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
