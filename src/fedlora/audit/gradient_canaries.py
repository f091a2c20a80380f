"""White-box gradient canaries for the sample-level (DP-SGD) audit, in the style of Steinke, Nasr & Jagielski's
one-run audit of DP-SGD: k canary "examples" in one client's DP-SGD, each inserted on a fair coin. An inserted
canary is Poisson-sampled into every batch at the client's own rate q, like a real example; when sampled it
contributes its fixed direction, scaled to the clip bound, in place of an example gradient, after the real
examples are clipped and before the noise. With per-group clipping (GroupClipDPOptimizer) its part in group g
has norm exactly C_g: the sensitivity of one real example, no more, no less.

Each canary is scored by sum over steps of sum_g <u_{i,g}, y_g - r_g> / C_g, where y is the noisy summed
gradient the optimizer produced (before Opacus divides it by the expected batch size), r the real examples'
clipped sum in it, and u_{i,g} the canary's unit direction in group g (the noise on group g has std
sigma*sqrt(G)*C_g, so this weighs every group by its signal-to-noise ratio). Subtracting r is DP's own threat
model: the adversary knows every example but the canary, and (independent of the coins) which real ones each
batch drew; the canary's privacy rests only on its own sampling and the noise. Without it the real gradients'
projections, up to ~ T*B/sqrt(d) (clipped gradients all pointing one way) against a signal of ~ T*q, can drown
the canaries (on MiniLM they stayed small against the noise: docs/results/audit/). The plain inner product
<u_i, y> is kept too (`scores_raw`: an adversary who sees the noisy gradients and nothing else).

Only the audit builds these: the canaries sit on the audited client's `SamplePrivacy` (`AuditedSamplePrivacy`)
and wrap the step of the one DP optimizer its session opens; a normal run never creates one, and no config
key reaches them. Opacus' `DPOptimizer.pre_step` calls `clip_and_accumulate()` then `add_noise()` (opacus 1.6,
pinned); the canaries wrap those two methods on the optimizer instance, which Opacus offers no hook for.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, fields

import numpy as np
import torch

from fedlora.dp import SamplePrivacy
from fedlora.privacy.dpsgd import GroupClipDPOptimizer


def group_clips(dp_optimizer) -> tuple[list[int], list[float]]:
    """(group of each of the optimizer's params, each group's clip bound): one group for flat clipping."""
    if isinstance(dp_optimizer, GroupClipDPOptimizer):
        return [dp_optimizer.group_of[id(p)] for p in dp_optimizer.params], list(dp_optimizer.group_clips)
    return [0] * len(dp_optimizer.params), [float(dp_optimizer.max_grad_norm)]


ORTHOGONAL_UP_TO = 50_000  # coordinates; above, random directions are near-orthogonal and QR costs k^2 d


def group_directions(count: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    """`count` unit rows in `dim` coordinates: orthonormal (a random frame) when count <= dim, so one canary's
    contribution has no projection on another's score; random unit rows when there are more canaries than
    coordinates (their cross-talk then adds ~ sqrt(count/dim) per sampled canary to every score)."""
    rows = torch.randn(dim, count, generator=gen, dtype=torch.float64)
    if count <= dim <= ORTHOGONAL_UP_TO:
        q, r = torch.linalg.qr(rows)
        return (q * torch.sign(torch.diagonal(r))).T.float()  # sign fix: Haar-distributed
    return (rows / rows.norm(dim=0)).T.float()


class GradientCanaries:
    """k white-box canaries in one client's DP-SGD; `inserted[i]` is canary i's coin. `scores` accumulates over
    every step of every round the client trains in."""

    def __init__(self, inserted: np.ndarray, seed: int):
        self.inserted = np.asarray(inserted, bool)
        self.seed = seed
        self.scores = np.zeros(len(self.inserted))
        self.scores_raw = np.zeros(len(self.inserted))
        self.sampled = np.zeros(len(self.inserted), np.int64)  # steps each canary was in (inserted ones only)
        self.steps = 0
        self._rng = np.random.default_rng([seed, 0x5A3])
        self._directions: dict[tuple, list[torch.Tensor]] = {}  # one (k, numel) matrix per param, per layout

    def directions(self, dp_optimizer, groups: list[int]) -> list[torch.Tensor]:
        """Every canary's fixed direction over the optimizer's params, unit norm within each clipping group.
        One set per parameter layout (RoLoRA trains A, then B: two layouts, each fixed)."""
        params = dp_optimizer.params
        key = tuple((tuple(p.shape), g) for p, g in zip(params, groups))
        if key not in self._directions:
            gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, len(self._directions)])
                                                    .generate_state(1)[0]))
            per_param: list[torch.Tensor | None] = [None] * len(params)
            for g in sorted(set(groups)):
                members = [i for i, gi in enumerate(groups) if gi == g]
                rows = group_directions(len(self.inserted), sum(params[i].numel() for i in members), gen)
                for i, part in zip(members, rows.split([params[i].numel() for i in members], dim=1)):
                    per_param[i] = part.contiguous().to(params[i].device, params[i].dtype)
            self._directions[key] = per_param
        return self._directions[key]

    def contribution(self, clip: float) -> float:
        """How far along its unit direction (per group) a sampled canary moves the sum: the group's clip bound,
        the most one clipped example can move it."""
        return clip

    @contextmanager
    def hooked(self, dp_optimizer, sample_rate: float):
        """Insert the sampled canaries into `dp_optimizer`'s clipped sum before its noise, and score the noisy
        sum, for every step taken inside the block."""
        groups, clips = group_clips(dp_optimizer)
        clip_and_accumulate, add_noise = dp_optimizer.clip_and_accumulate, dp_optimizer.add_noise

        real: list[torch.Tensor] = []

        def clip_then_insert() -> None:
            clip_and_accumulate()
            real[:] = [p.summed_grad.detach().clone() for p in dp_optimizer.params]
            dirs = self.directions(dp_optimizer, groups)
            here = np.flatnonzero(self.inserted & (self._rng.random(len(self.inserted)) < sample_rate))
            self.sampled[here] += 1
            self.steps += 1
            if len(here) == 0:
                return
            rows = torch.as_tensor(here, device=dirs[0].device)
            for p, u, g in zip(dp_optimizer.params, dirs, groups):
                step = (self.contribution(clips[g]) * u[rows].sum(dim=0)).view_as(p).to(p.summed_grad.dtype)
                p.summed_grad = p.summed_grad + step

        def noise_then_score() -> None:
            add_noise()
            dirs = self.directions(dp_optimizer, groups)
            raw, known = (torch.zeros(len(self.inserted), dtype=torch.float64, device=dirs[0].device) for _ in "ab")
            for p, u, g, r in zip(dp_optimizer.params, dirs, groups, real):
                y = p.grad.reshape(-1).to(u.dtype)
                raw += (u @ y).double() / clips[g]
                known += (u @ (y - r.reshape(-1).to(u.dtype))).double() / clips[g]
            self.scores_raw += raw.cpu().numpy()
            self.scores += known.cpu().numpy()

        dp_optimizer.clip_and_accumulate, dp_optimizer.add_noise = clip_then_insert, noise_then_score
        try:
            yield
        finally:
            del dp_optimizer.clip_and_accumulate, dp_optimizer.add_noise  # back to the class's methods

    def ever_sampled(self) -> int:
        return int(np.sum(self.sampled > 0))


@dataclass
class AuditedSamplePrivacy(SamplePrivacy):
    """The audited client's DP-SGD state with its gradient canaries in every session. Saved as a plain
    `SamplePrivacy` (the canaries are the audit's, never in a checkpoint a normal run could resume)."""

    canaries: GradientCanaries | None = None

    @classmethod
    def of(cls, base: SamplePrivacy, canaries: GradientCanaries) -> "AuditedSamplePrivacy":
        return cls(**{f.name: getattr(base, f.name) for f in fields(SamplePrivacy)}, canaries=canaries)

    @contextmanager
    def session(self, cfg, model, optimizer, n, rng, round_idx, client_id):
        with super().session(cfg, model, optimizer, n, rng, round_idx, client_id) as session:
            with self.canaries.hooked(session.optimizer, self.sample_rate):
                yield session
