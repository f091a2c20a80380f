"""The round logic, independent of transport: sample clients, build each client's downlink for its rank,
validate and aggregate updates with the registered strategy, keep merged base deltas, record privacy.

Engines (in-process or Flower) call `plan_round`, deliver the downlinks, and hand the updates to
`finish_round`. `state_dict` holds everything needed to continue a run exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from fedlora import lora
from fedlora.client import Downlink, Update
from fedlora.config import ExperimentConfig, RoundFailed
from fedlora.strategies import LoraFactors, Strategy, weighted_mean

BYTES_PER_VALUE = 4  # float32 on the wire


@dataclass
class RoundOutcome:
    """What one aggregation changed, for the engine (merges) and the metrics."""

    base_delta: dict[str, np.ndarray]
    trained: list[int]
    rejected: dict[int, str]
    bytes_up: int
    bytes_down: int
    bytes_up_head: int
    extra: dict = field(default_factory=dict)


def validate_update(update: Update, expected: set[str]) -> str | None:
    """Why an update must be rejected, or None. Checks before the strategy sees anything."""
    if set(update.factors) != expected:
        missing, extra = sorted(expected - set(update.factors)), sorted(set(update.factors) - expected)
        return f"wrong module set (missing {missing[:2]}, unexpected {extra[:2]})"
    for name, f in update.factors.items():
        if f.A.ndim != 2 or f.B.ndim != 2 or f.A.shape[0] != f.B.shape[1]:
            return f"module {name}: inconsistent shapes A{f.A.shape} B{f.B.shape}"
        if f.A.shape[0] > update.rank:
            return f"module {name}: rank {f.A.shape[0]} above the client's rank {update.rank}"
        if not (np.all(np.isfinite(f.A)) and np.all(np.isfinite(f.B))):
            return f"module {name}: non-finite values"
    for name, h in update.head.items():
        if not np.all(np.isfinite(h)):
            return f"head {name}: non-finite values"
    return None


class Server:
    """Holds the global state between rounds: per-rank downlinks, head, merged deltas, client ranks."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        strategy: Strategy,
        dims: dict[str, tuple[int, int]],
        head: dict[str, np.ndarray],
        client_sizes: list[int],
    ):
        self.cfg = cfg
        self.strategy = strategy
        self.dims = dims
        self.client_sizes = list(client_sizes)
        self.client_ranks = cfg.client_ranks()
        self.round = 0
        self.head = head
        self.base_delta: dict[str, np.ndarray] = {}  # everything merged into the base weights so far
        r_max = max(self.client_ranks)
        # Round 1 starts from the PEFT init every client can derive from the seed: A seeded, B = 0.
        self.global_factors: dict[str, LoraFactors] = lora.initial_factors(cfg.seed, dims, r_max, cfg.lora.scale(r_max))
        self._downlinks: dict[int, dict[str, LoraFactors]] = {}
        self._down_nbytes: dict[int, int] = {}
        self._fresh = True  # the downlinks are prefixes of the seeded init
        self.rng = np.random.default_rng([cfg.seed, 1])
        self.privacy: dict[int, dict] = {}  # last privacy report per client (accountant state, epsilon)
        if cfg.privacy.mode == "client":
            from fedlora.dp import client_level_calibration

            self.client_dp_sigma, self.client_dp_q = client_level_calibration(cfg)

    # -- downlinks -------------------------------------------------------------------------------
    def downlink_factors(self, rank: int) -> dict[str, LoraFactors]:
        if self.strategy.fresh_lora_each_round and self.round > 0:
            return {}
        if self._fresh:
            return {n: LoraFactors(A=f.A[:rank], B=f.B[:, :rank], scale=self.cfg.lora.scale(rank))
                    for n, f in self.global_factors.items()}
        return self._downlinks[rank]

    def downlink(self, client_id: int) -> Downlink:
        rank = self.client_ranks[client_id]
        return Downlink(rank=rank, factors=self.downlink_factors(rank), head=self.head, round=self.round + 1)

    def downlink_nbytes(self, rank: int) -> int:
        head = sum(h.size for h in self.head.values()) * BYTES_PER_VALUE
        if self._fresh:
            # The seeded init: A is derived from the seed, B is zero; a FedIT-style client still gets A sent.
            per = sum((d_out * rank) + (rank * d_in if self.strategy.sends_A else 0) for d_out, d_in in self.dims.values())
            return per * BYTES_PER_VALUE + head
        return self._down_nbytes[rank] + head

    # -- rounds ----------------------------------------------------------------------------------
    def sample_clients(self) -> list[int]:
        k = self.cfg.federation.per_round()
        n = self.cfg.federation.num_clients
        return sorted(int(i) for i in self.rng.choice(n, size=k, replace=False)) if k < n else list(range(n))

    def draw_dropouts(self, sampled: list[int]) -> set[int]:
        """Clients that fail this round (federation.dropout, for testing robustness)."""
        p = self.cfg.federation.dropout
        if p <= 0:
            return set()
        return {c for c in sampled if self.rng.random() < p}

    def finish_round(self, updates: list[Update], sampled: list[int], max_norm: float | None = None) -> RoundOutcome:
        """Validate, aggregate, update the global state. Raises RoundFailed if too few clients remain."""
        expected = set(self.dims)
        rejected: dict[int, str] = {}
        good: list[Update] = []
        for u in updates:
            reason = validate_update(u, expected)
            if reason is None and u.rank != self.client_ranks[u.client_id]:
                reason = f"rank {u.rank} differs from the client's assigned rank {self.client_ranks[u.client_id]}"
            if reason is None:
                reason = self._check_shapes(u)
            if reason is None and max_norm is not None:
                norm = self.change_norm(u)
                if norm > max_norm:
                    reason = f"update norm {norm:.3g} above the bound {max_norm:.3g}"
            if reason:
                rejected[u.client_id] = reason
            else:
                good.append(u)
        if len(good) < self.cfg.federation.min_clients:
            why = "; ".join(f"client {c}: {r}" for c, r in sorted(rejected.items()))
            raise RoundFailed(
                f"round {self.round + 1}: only {len(good)} valid updates, fewer than federation.min_clients="
                f"{self.cfg.federation.min_clients}" + (f" (rejected: {why})" if why else "")
            )
        bytes_down = sum(self.downlink_nbytes(self.client_ranks[c]) for c in sampled)
        bytes_up_lora = sum(self.strategy.uplink_nbytes(u.factors) for u in good)
        bytes_up_head = sum(sum(h.size for h in u.head.values()) * BYTES_PER_VALUE for u in good)
        extra: dict = {}
        if self.cfg.privacy.mode == "client":
            good, extra = self._client_level_dp(good)
            weights = [1.0] * len(good)  # data-size weights would let one client's influence exceed the clip
        else:
            weights = [float(u.num_examples) for u in good]
        result = self.strategy.aggregate([u.factors for u in good], weights)
        if good[0].head:
            self.head = {k: weighted_mean([u.head[k] for u in good], weights).astype(np.float32) for k in good[0].head}

        for name, d in result.base_delta.items():
            self.base_delta[name] = self.base_delta.get(name, 0) + d
        self._fresh = False
        for u in good:
            if u.next_rank is not None and u.next_rank != u.rank:
                self.client_ranks[u.client_id] = u.next_rank
            if u.privacy and self.cfg.privacy.mode == "sample":
                self.privacy[u.client_id] = u.privacy
        ranks_needed = set(self.client_ranks) | {max(self.client_ranks)}
        self._downlinks = {} if self.strategy.fresh_lora_each_round else {r: result.downlink(r) for r in ranks_needed}
        self._down_nbytes = {r: int(result.downlink_nbytes(r)) for r in ranks_needed}
        self.round += 1
        return RoundOutcome(
            base_delta=dict(result.base_delta),
            trained=[u.client_id for u in good],
            rejected=rejected,
            bytes_up=bytes_up_lora + bytes_up_head,
            bytes_down=bytes_down,
            bytes_up_head=bytes_up_head,
            extra=extra,
        )

    def _reference(self, u: Update) -> dict[str, LoraFactors]:
        """The factors the client started this round from (FLoRA: its fresh, seed-derived init)."""
        from fedlora.client import fresh_factors

        return self.downlink_factors(u.rank) or fresh_factors(self.cfg, self.dims, u.rank, self.round + 1, u.client_id)

    def _check_shapes(self, u: Update) -> str | None:
        for name, (d_out, d_in) in self.dims.items():
            f = u.factors[name]
            if f.A.shape != (u.rank, d_in) or f.B.shape != (d_out, u.rank):
                return f"module {name}: shapes A{f.A.shape} B{f.B.shape}, expected A{(u.rank, d_in)} B{(d_out, u.rank)}"
        for name, h in self.head.items():
            if name not in u.head or u.head[name].shape != h.shape:
                return f"head {name}: missing or wrong shape"
        return None

    def change_norm(self, u: Update) -> float:
        """L2 norm of what the client changed in what it sends (factors and head) this round."""
        from fedlora.dp import sent_tensors

        sends_A = self.strategy.sends_A
        now, ref = sent_tensors(u.factors, u.head, sends_A), sent_tensors(self._reference(u), self.head, sends_A)
        return float(np.sqrt(sum(np.sum((now[k] - ref[k]) ** 2) for k in now)))

    # -- client-level DP ---------------------------------------------------------------------------
    def _client_level_dp(self, good: list[Update]) -> tuple[list[Update], dict]:
        """DP-FedAvg on what is sent: clip each client's change to S, Gaussian noise, one accountant step.

        For linear methods the noise N(0, sigma^2 S^2) is added once to the sum: folded into the summand of
        a client of the largest rank before a uniform-weight (slot-wise) mean, which is exactly noise on the
        (per-slot) sum divided by the (per-slot) count. Other methods get that noise on every update.
        """
        from fedlora.dp import add_noise, clip_client_update, noise_placement
        from fedlora.privacy import ClientAccountant

        p = self.cfg.privacy
        sigma, q = self.client_dp_sigma, self.client_dp_q
        rng = np.random.default_rng([self.cfg.seed, self.round + 1, 99])
        sends_A = self.strategy.sends_A
        placement = noise_placement(self.strategy)
        noisy_at = max(range(len(good)), key=lambda i: good[i].rank) if placement == "sum" else None
        out, norms = [], {}
        for i, u in enumerate(good):
            ref = self._reference(u)
            factors, head, norms[u.client_id] = clip_client_update(u.factors, u.head, ref, self.head, p.clip, sends_A)
            if placement == "each" or i == noisy_at:
                factors, head = add_noise(factors, head, sigma * p.clip, sends_A, rng)
            out.append(replace(u, factors=factors, head=head))
        # Subsampled Gaussian over rounds: every client is charged every round (sampling rate q covers it).
        for c in range(self.cfg.federation.num_clients):
            acc = ClientAccountant.from_state_dict(self.privacy[c]["accountant"]) if c in self.privacy else ClientAccountant(p.accountant)
            acc.step(sigma, q, 1)
            self.privacy[c] = {"epsilon": acc.epsilon(p.delta), "noise_multiplier": sigma, "sample_rate": q,
                               "dp_steps": acc.total_steps, "accountant": acc.state_dict()}
        return out, {"update_norms": {str(k): v for k, v in norms.items()}, "noise_placement": placement}

    def global_eval_factors(self) -> tuple[int, dict[str, LoraFactors]]:
        """The global model's adapter: the downlink of the highest rank (zeros after a FLoRA merge)."""
        r_max = max(self.client_ranks)
        factors = self.downlink_factors(r_max)
        if not factors:
            factors = {n: LoraFactors(A=f.A, B=np.zeros_like(f.B), scale=f.scale)
                       for n, f in lora.initial_factors(self.cfg.seed, self.dims, r_max, self.cfg.lora.scale(r_max)).items()}
        return r_max, factors

    # -- checkpoint --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: a nested dict of JSON values and NumPy arrays."""
        state = {
            "round": self.round,
            "client_ranks": list(self.client_ranks),
            "head": dict(self.head),
            "base_delta": dict(self.base_delta),
            "global_factors": dict(self.global_factors),
            "downlinks": {r: dict(f) for r, f in self._downlinks.items()},
            "down_nbytes": dict(self._down_nbytes),
            "fresh": self._fresh,
            "rng": self.rng.bit_generator.state,
            "privacy": dict(self.privacy),
            "strategy": self.strategy.state_dict(),
        }
        return state

    def load_state_dict(self, state: dict) -> None:
        self.round = int(state["round"])
        self.client_ranks = [int(r) for r in state["client_ranks"]]
        self.head = state["head"]
        self.base_delta = state["base_delta"]
        self.global_factors = state["global_factors"]
        self._downlinks = {int(r): f for r, f in state["downlinks"].items()}
        self._down_nbytes = {int(r): int(n) for r, n in state["down_nbytes"].items()}
        self._fresh = bool(state["fresh"])
        self.rng.bit_generator.state = state["rng"]
        self.privacy = {int(c): rep for c, rep in state["privacy"].items()}
        self.strategy.load_state_dict(state["strategy"])
