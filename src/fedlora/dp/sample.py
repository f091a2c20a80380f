"""Sample-level DP (privacy.mode = "sample"): one client's DP-SGD state and its training session.

sigma is calibrated once per client from the target epsilon and every local step it may take over all rounds;
one accountant per client for the whole run; the budget is enforced (a client that would exceed it sits out).
The math lives in `fedlora.privacy` (Opacus accountants, per-example clipping).
"""

from __future__ import annotations

import secrets
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from fedlora.client import TrainingSession
from fedlora.config import ExperimentConfig
from fedlora.privacy import (
    ClientAccountant,
    calibrate_noise_multiplier,
    noise_only_step,
    poisson_batches,
    private_training,
    would_exceed,
)


def noise_seed(cfg: ExperimentConfig) -> int:
    """The root of a noise generator: 128 bits of OS entropy, or (privacy.reproducible_noise, a research option)
    a function of the config's seed that anyone holding the config can recompute."""
    if cfg.privacy.reproducible_noise:
        return int(np.random.SeedSequence([cfg.seed, 0xD15EA5E]).generate_state(2, np.uint64)[0])
    return secrets.randbits(128)


@dataclass
class SamplePrivacy:
    """One client's sample-level DP-SGD state. Lives as long as the run (and in checkpoints)."""

    noise_multiplier: float
    sample_rate: float
    clip: float
    delta: float
    target_epsilon: float | None
    accountant: ClientAccountant
    # The root of this client's DP-SGD noise: OS entropy unless privacy.reproducible_noise. Kept with the
    # client's private state (and the run's checkpoint), never in a report, the config or the metrics.
    noise_root: int = 0

    @classmethod
    def for_client(cls, cfg: ExperimentConfig, num_examples: int) -> "SamplePrivacy":
        p, fed = cfg.privacy, cfg.federation
        q = min(1.0, cfg.local_batch_size() / max(num_examples, 1))
        sigma = p.noise_multiplier
        if sigma is None:
            # Calibrated once for every local step this client may take in the whole run (all rounds).
            sigma = calibrate_noise_multiplier(p.epsilon, p.delta, q, fed.rounds * cfg.local_steps(), p.accountant)
        return cls(sigma, q, p.clip, p.delta, p.epsilon, ClientAccountant(p.accountant), noise_seed(cfg))

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
                "accountant": self.accountant.state_dict(), "noise_root": self.noise_root}

    @classmethod
    def from_state_dict(cls, d: dict) -> "SamplePrivacy":
        return cls(d["noise_multiplier"], d["sample_rate"], d["clip"], d["delta"], d["target_epsilon"],
                   ClientAccountant.from_state_dict(d["accountant"]), int(d["noise_root"]))

    def batches(self, cfg: ExperimentConfig, n: int, rng: np.random.Generator) -> list[np.ndarray]:
        """This round's Poisson batches (q = expected batch / n), the sampling the accountant analyses."""
        return poisson_batches(n, self.sample_rate, cfg.local_steps(), rng)

    def noise_generator(self, round_idx: int, client_id: int, device: torch.device) -> torch.Generator:
        """This client's DP-SGD noise generator for one round, derived from its private noise root."""
        seed = np.random.SeedSequence([self.noise_root, round_idx, client_id, 7]).generate_state(2, np.uint64)[0]
        return torch.Generator(device=device).manual_seed(int(seed) & (2**63 - 1))

    @contextmanager
    def session(self, cfg: ExperimentConfig, model, optimizer, n: int, rng: np.random.Generator, round_idx: int,
                client_id: int):
        """This client's DP-SGD session for one round: Poisson batches (q = expected batch / n), Opacus'
        per-example clipping and Gaussian noise, and its accountant charged for every step taken."""
        batches = self.batches(cfg, n, rng)
        with private_training(
            model, optimizer, noise_multiplier=self.noise_multiplier, clip=self.clip,
            expected_batch_size=cfg.local_batch_size(),
            generator=self.noise_generator(round_idx, client_id, next(model.parameters()).device),
            accountant=self.accountant, sample_rate=self.sample_rate, clip_groups=clip_groups(cfg, model),
        ) as (module, dp_optimizer):
            session = TrainingSession(module, dp_optimizer, batches, set_to_none=False, micro_batched=True)

            def empty_step() -> None:
                noise_only_step(dp_optimizer)
                dp_optimizer.zero_grad()

            def accumulate() -> None:
                # Opacus' virtual step (what its BatchMemoryManager does): a skipped step clips this micro-batch's
                # per-example gradients into `summed_grad` and stops there: no noise, no update, no accounting;
                # zero_grad then drops the per-example gradients and keeps the sum. The batch's last micro-batch
                # takes the real step: its examples are clipped into the same sum, noise is added once and the
                # sum divided by the expected batch size (accumulated_iterations is 1: one backward since the last
                # zero_grad), exactly the padded step's arithmetic on the same examples.
                dp_optimizer.signal_skip_step(True)
                dp_optimizer.step()

            session.empty_step = empty_step
            session.accumulate = accumulate
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
