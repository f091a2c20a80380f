"""The round logic, independent of transport: sample clients, build each client's downlink for its rank,
check and aggregate updates with the registered strategy, keep merged base deltas, record privacy.

The server trusts nothing a client sends. What a client may send (modules, shapes, rank, scale, head keys,
counts) comes from the server's own state (`expected_rank`, `dims`, `head`); anything else rejects that client
with a reason, and the round goes on while federation.min_clients valid updates remain. A strategy that
refuses one client's update (its ValueError) rejects that client, not the round.

`state_dict` holds everything needed to continue a run exactly.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace

import numpy as np

from fedlora import lora
from fedlora.client import Downlink, Update
from fedlora.config import ExperimentConfig, RoundFailed
from fedlora.strategies import WIRE_BYTES, AggregationResult, LoraFactors, Strategy, weighted_mean
from fedlora.strategies.base import parts_nbytes

MAX_EXAMPLES = 10**9  # the largest example count (a client's aggregation weight) the server accepts


@dataclass
class RoundOutcome:
    """What one aggregation changed, for the engine (merges) and the metrics."""

    base_delta: dict[str, np.ndarray]
    trained: list[int]
    rejected: dict[int, str]
    bytes_up: int
    bytes_up_head: int
    bytes_down: int
    extra: dict = field(default_factory=dict)


def _finite(x: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(x)))


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
        from fedlora.dp import make_mechanism

        self.cfg = cfg
        self.strategy = strategy
        self.dims = dims
        self.client_sizes = list(client_sizes)
        self.client_ranks = cfg.client_ranks()
        self.round = 0
        self.head = head
        self.base_delta: dict[str, np.ndarray] = {}  # everything merged into the base weights so far
        r_max = max(self.client_ranks)
        # Round 1 starts from what every client can derive from the seed: the PEFT init (A seeded, B = 0), or the
        # method's own start from it (Fed-SB: fixed B0, R = 0).
        self.initial: dict[str, LoraFactors] = strategy.starting_factors(
            lora.initial_factors(cfg.seed, dims, r_max, cfg.lora.scale(r_max)))
        self._downlinks: dict[int, dict[str, LoraFactors]] = {}
        self._base_nbytes = 0  # bytes of the base deltas the last round added (sent with the next downlinks)
        self._fresh = True  # the downlinks are prefixes of the seeded init
        self.rng = np.random.default_rng([cfg.seed, 1])
        self.privacy: dict[int, dict] = {}  # last privacy report per client (accountant state, epsilon)
        self.mechanism = make_mechanism(cfg)  # privacy on the server side: none, sample-level or client-level

    # -- downlinks -------------------------------------------------------------------------------
    def downlink_factors(self, rank: int) -> dict[str, LoraFactors]:
        if self.strategy.fresh_lora_each_round and self.round > 0:
            return {}
        if self._fresh:
            return {n: LoraFactors(A=f.A[:rank], B=f.B[:, :rank], scale=self.cfg.lora.scale(rank))
                    for n, f in self.initial.items()}
        return self._downlinks[rank]

    def downlink(self, client_id: int) -> Downlink:
        rank = self.client_ranks[client_id]
        return Downlink(rank=rank, factors=self.downlink_factors(rank), head=self.head, round=self.round + 1)

    def downlink_nbytes(self, rank: int) -> int:
        """Bytes sent to a rank-`rank` client this round: the parts the method sends down (the seeded init is
        sent like any other adapter: a FedIT-style client still gets A), the head, new base deltas."""
        head = sum(h.size for h in self.head.values()) * WIRE_BYTES
        factors = 0 if self.strategy.fresh_lora_each_round and not self._fresh \
            else parts_nbytes(self.strategy.roles(self.round + 1).down, rank, self.dims)
        return factors + head + (0 if self._fresh else self._base_nbytes)

    def up_parts(self) -> tuple[str, ...]:
        """What clients send in the round being run (the server reads nothing else of an update)."""
        return self.strategy.roles(self.round + 1).up

    # -- rounds ----------------------------------------------------------------------------------
    def sample_clients(self) -> list[int]:
        """This round's clients: fixed-size sampling without replacement, or what the privacy mechanism needs
        (client-level DP: Poisson sampling, the model its accountant analyses)."""
        n = self.cfg.federation.num_clients
        sampled = self.mechanism.sample_clients(self, self.rng)
        if sampled is not None:
            return sampled
        k = self.cfg.federation.per_round()
        return sorted(int(i) for i in self.rng.choice(n, size=k, replace=False)) if k < n else list(range(n))

    def draw_dropouts(self, sampled: list[int]) -> set[int]:
        """Clients that fail this round (federation.dropout, for testing robustness)."""
        p = self.cfg.federation.dropout
        if p <= 0:
            return set()
        return {c for c in sampled if self.rng.random() < p}

    def expected_rank(self, client_id: int) -> int:
        return self.client_ranks[client_id]

    def check_update(self, u: Update) -> str | None:
        """Why this update must be rejected, or None: everything is compared with the server's own state."""
        if not isinstance(u.client_id, int) or not 0 <= u.client_id < len(self.client_ranks):
            return f"unknown client id {u.client_id!r}"
        rank = self.expected_rank(u.client_id)
        if u.rank != rank:
            return f"rank {u.rank} differs from the client's assigned rank {rank}"
        if not isinstance(u.num_examples, int) or not 1 <= u.num_examples <= MAX_EXAMPLES:
            return f"example count {u.num_examples!r} is not an integer in 1..{MAX_EXAMPLES}"
        if set(u.factors) != set(self.dims):
            missing, extra = sorted(set(self.dims) - set(u.factors)), sorted(set(u.factors) - set(self.dims))
            return f"wrong module set (missing {missing[:2]}, unexpected {extra[:2]})"
        scale = self.cfg.lora.scale(rank)
        for name, (d_out, d_in) in self.dims.items():
            f = u.factors[name]
            if not (isinstance(f.A, np.ndarray) and isinstance(f.B, np.ndarray)) or f.A.dtype.kind != "f" \
                    or f.B.dtype.kind != "f":
                return f"module {name}: factors must be float arrays"
            if f.A.ndim == 2 and f.B.ndim == 2 and f.A.shape[0] == f.B.shape[1] and f.A.shape[0] > rank:
                return f"module {name}: rank {f.A.shape[0]} above the client's rank {rank}"
            if f.A.shape != (rank, d_in) or f.B.shape != (d_out, rank):
                return f"module {name}: shapes A{f.A.shape} B{f.B.shape}, expected A{(rank, d_in)} B{(d_out, rank)}"
            if not (_finite(f.A) and _finite(f.B)):
                return f"module {name}: non-finite values"
            if not math.isclose(float(f.scale), scale, rel_tol=1e-6):
                return f"module {name}: scale {f.scale} differs from the server's {scale} for rank {rank}"
        if set(u.head) != set(self.head):
            return f"head keys {sorted(u.head)[:3]} differ from the server's {sorted(self.head)[:3]}"
        for name, h in self.head.items():
            got = u.head[name]
            if not isinstance(got, np.ndarray) or got.dtype.kind != "f" or got.shape != h.shape:
                return f"head {name}: wrong type or shape, expected float {h.shape}"
            if not _finite(got):
                return f"head {name}: non-finite values"
        if u.next_rank is not None:
            if not isinstance(u.next_rank, int) or not 1 <= u.next_rank <= rank:
                return f"next rank {u.next_rank!r} is not an integer in 1..{rank}"
            if u.next_rank != rank and not self.strategy.clients_change_rank:
                return f"next rank {u.next_rank}: {self.strategy.name} clients keep their rank"
        return self.mechanism.check_report(self, u)

    def finish_round(self, updates: list[Update], sampled: list[int], max_norm: float | None = None) -> RoundOutcome:
        """Check, bound, aggregate, update the global state. Raises RoundFailed if too few clients remain."""
        rejected: dict[int, str] = {}
        good: list[Update] = []
        seen: set[int] = set()
        for u in updates:
            reason = self.check_update(u)
            if reason is None and u.client_id in seen:
                reason = "a second update from this client this round"
            if reason is None and u.client_id not in sampled:
                reason = "this client was not sampled this round"
            if reason:
                rejected[u.client_id if isinstance(u.client_id, int) else -1] = reason
            else:
                good.append(self._as_sent(u))
                seen.add(u.client_id)
        good, norms = self._bound_norms(good, rejected, max_norm)
        self._enough(good, rejected)
        bytes_down = sum(self.downlink_nbytes(self.client_ranks[c]) for c in sampled)

        result, good, extra = self._aggregate(good, rejected)
        extra["update_norms"] = {str(u.client_id): norms[u.client_id] for u in good}
        bytes_up_lora = sum(self.strategy.uplink_nbytes(u.factors, self.round + 1) for u in good)
        bytes_up_head = sum(sum(h.size for h in u.head.values()) * WIRE_BYTES for u in good)

        for name, d in result.base_delta.items():
            self.base_delta[name] = self.base_delta.get(name, 0) + d
        self._fresh = False
        for u in good:
            if u.next_rank is not None and u.next_rank != u.rank:
                self.client_ranks[u.client_id] = u.next_rank
        self.mechanism.after_round(self, good)
        ranks_needed = set(self.client_ranks) | {max(self.client_ranks)}
        self._downlinks = {} if self.strategy.fresh_lora_each_round else {r: result.downlink(r) for r in ranks_needed}
        self._base_nbytes = int(result.base_delta_nbytes())
        self.round += 1
        return RoundOutcome(
            base_delta=dict(result.base_delta),
            trained=[u.client_id for u in good],
            rejected=rejected,
            bytes_up=bytes_up_lora + bytes_up_head,
            bytes_up_head=bytes_up_head,
            bytes_down=bytes_down,
            extra=extra,
        )

    # -- secure aggregation (fedlora.secagg): the server holds the round's sum, never one update ---------------
    def finish_summed_round(self, summed, sampled: list[int]) -> RoundOutcome:
        """A round under secure aggregation. `summed.mean` is the weighted mean of the members' uploads at the
        widest member's rank, the one update the strategy aggregates; `summed.members` carry each contributor's
        metadata only (id, rank, weight, loss, privacy report). Checks that need one client's update (norm
        bounds, a strategy refusing one client) cannot run; a member whose metadata does not check out cannot
        be taken out of the sum, so it fails the round. Raises RoundFailed."""
        members = summed.members
        bad = {}
        for u in members:
            rank = self.expected_rank(u.client_id) if 0 <= u.client_id < len(self.client_ranks) else None
            why = ("not sampled this round" if u.client_id not in sampled else
                   f"rank {u.rank} differs from its assigned rank {rank}" if u.rank != rank else
                   self.mechanism.check_report(self, u))
            if why:
                bad[u.client_id] = why
        if bad or len({u.client_id for u in members}) != len(members):
            raise RoundFailed(f"round {self.round + 1}: secure aggregation: a summed client does not check out "
                              f"({'; '.join(f'client {c}: {r}' for c, r in sorted(bad.items())) or 'duplicate'})")
        self._enough(members, {})
        mean = self._as_sent(summed.mean)
        widest = next(u for u in members if u.client_id == mean.client_id)
        reason = self.check_update(replace(mean, privacy=widest.privacy))
        if reason:
            raise RoundFailed(f"round {self.round + 1}: secure aggregation: the summed update is invalid: {reason}")
        saved = copy.deepcopy(self.strategy.state_dict())
        try:
            result = self.strategy.aggregate([mean.factors], [1.0])
        except ValueError as exc:
            self.strategy.load_state_dict(saved)
            raise RoundFailed(f"round {self.round + 1}: {self.strategy.name} refused the secure sum: {exc}") from None
        if mean.head:
            self.head = {k: np.asarray(v, np.float32) for k, v in mean.head.items()}
        bytes_down = sum(self.downlink_nbytes(self.client_ranks[c]) for c in sampled)
        for name, d in result.base_delta.items():
            self.base_delta[name] = self.base_delta.get(name, 0) + d
        self._fresh = False
        self.mechanism.after_round(self, members)
        ranks_needed = set(self.client_ranks) | {max(self.client_ranks)}
        self._downlinks = {} if self.strategy.fresh_lora_each_round else {r: result.downlink(r) for r in ranks_needed}
        self._base_nbytes = int(result.base_delta_nbytes())
        self.round += 1
        return RoundOutcome(base_delta=dict(result.base_delta), trained=sorted(u.client_id for u in members),
                            rejected={}, bytes_up=0, bytes_up_head=0, bytes_down=bytes_down, extra=dict(summed.extra))

    def skip_round(self, sampled: list[int]) -> RoundOutcome:
        """A round that produced no aggregate (secure aggregation halted below its threshold): the global model
        stays as it is and the run goes on with the next round."""
        bytes_down = sum(self.downlink_nbytes(self.client_ranks[c]) for c in sampled)
        self.round += 1
        return RoundOutcome(base_delta={}, trained=[], rejected={}, bytes_up=0, bytes_up_head=0,
                            bytes_down=bytes_down)

    def _enough(self, good: list[Update], rejected: dict[int, str]) -> None:
        if len(good) < self.cfg.federation.min_clients:
            why = "; ".join(f"client {c}: {r}" for c, r in sorted(rejected.items()))
            raise RoundFailed(
                f"round {self.round + 1}: only {len(good)} valid updates, fewer than federation.min_clients="
                f"{self.cfg.federation.min_clients}" + (f" (rejected: {why})" if why else "")
            )

    # -- bounds on what one client can move ------------------------------------------------------
    def _bound_norms(self, good: list[Update], rejected: dict[int, str],
                     max_norm: float | None) -> tuple[list[Update], dict[int, float]]:
        """Reject updates that changed more than `max_norm` (L2 over what is sent); scale down those above
        federation.norm_bound_factor x the round's median change, so no client dominates by magnitude."""
        norms = {u.client_id: self.change_norm(u) for u in good}
        kept = []
        for u in good:
            if max_norm is not None and norms[u.client_id] > max_norm:
                rejected[u.client_id] = (f"update norm {norms[u.client_id]:.3g} above the bound {max_norm:.3g} "
                                         "(federation.max_update_norm)")
            else:
                kept.append(u)
        factor = self.cfg.federation.norm_bound_factor
        if factor is None or len(kept) < 3:  # a median of one or two is the suspect's own norm
            return kept, norms
        bound = factor * float(np.median([norms[u.client_id] for u in kept]))
        out = []
        for u in kept:
            n = norms[u.client_id]
            if n > bound > 0:
                u = self._scaled_change(u, bound / n)
            out.append(u)
        return out, norms

    def sent_factors(self, client_id: int) -> dict[str, LoraFactors]:
        """The factors a client starts this round from (FLoRA: its fresh, seed-derived init)."""
        from fedlora.client import fresh_factors

        rank = self.expected_rank(client_id)
        return self.downlink_factors(rank) or fresh_factors(self.cfg, self.dims, rank, self.round + 1, client_id)

    def reference(self, u: Update) -> tuple[dict[str, LoraFactors], dict[str, np.ndarray]]:
        """The factors and head the client started this round from."""
        return self.sent_factors(u.client_id), self.head

    def _as_sent(self, u: Update) -> Update:
        """The update as the server may read it: the parts the client sends this round, every other part
        replaced by what the server itself sent (FFA's A, FedSA's B, which stays on the client)."""
        ref = self.sent_factors(u.client_id)
        parts = self.up_parts()
        factors = {}
        for n, f in u.factors.items():
            sent = {p: np.asarray(a, np.float32) for p, a in self.strategy.to_parts(n, f, parts).items()}
            factors[n] = self.strategy.from_parts(n, sent, ref[n])
        return replace(u, factors=factors)

    def _sent_change(self, u: Update) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(now, ref): what the client sends this round and the same arrays of what it started from."""
        from fedlora.dp import sent_tensors

        parts = self.up_parts()
        ref_factors, ref_head = self.reference(u)
        return (sent_tensors(self.strategy, parts, u.factors, u.head),
                sent_tensors(self.strategy, parts, ref_factors, ref_head))

    def change_norm(self, u: Update) -> float:
        """L2 norm of what the client changed in what it sends (factors and head) this round."""
        now, ref = self._sent_change(u)
        return float(np.sqrt(sum(np.sum((now[k] - ref[k]) ** 2) for k in now)))

    def _scaled_change(self, u: Update, c: float) -> Update:
        """The update with its change (against its reference) multiplied by c."""
        from fedlora.dp import from_sent

        now, ref = self._sent_change(u)
        factors, head = from_sent(self.strategy, self.up_parts(), {k: ref[k] + c * (now[k] - ref[k]) for k in now},
                                  u.factors, u.head)
        return replace(u, factors=factors, head=head)

    # -- aggregation -----------------------------------------------------------------------------
    def _aggregate(self, good: list[Update], rejected: dict[int, str]) -> tuple[AggregationResult, list[Update], dict]:
        """The privacy mechanism prepares the updates, the strategy aggregates them. A strategy's ValueError is
        traced to the clients whose update it refuses on its own; they are rejected and the round retried."""
        saved = copy.deepcopy(self.strategy.state_dict())
        while True:
            prepared, weights, extra = self.mechanism.prepare(self, good)
            try:
                result = self.strategy.aggregate([u.factors for u in prepared], weights)
                head = self._aggregate_head(prepared, weights)
                break
            except ValueError as exc:
                self.strategy.load_state_dict(copy.deepcopy(saved))
                bad = self._refused_alone(prepared)
                if not bad:
                    raise RoundFailed(f"round {self.round + 1}: {self.strategy.name} cannot aggregate this round's "
                                      f"updates together: {exc}") from None
                for u in good:
                    if u.client_id in bad:
                        rejected[u.client_id] = f"refused by {self.strategy.name}: {bad[u.client_id]}"
                good = [u for u in good if u.client_id not in bad]
                self._enough(good, rejected)
        if head is not None:
            self.head = head
        return result, good, extra

    def _refused_alone(self, updates: list[Update]) -> dict[int, str]:
        """client -> the strategy's reason, for every update it refuses even on its own."""
        bad = {}
        for u in updates:
            saved = copy.deepcopy(self.strategy.state_dict())
            try:
                self.strategy.aggregate([u.factors], [1.0])
            except ValueError as exc:
                bad[u.client_id] = " ".join(str(exc).split())[:300]
            finally:
                self.strategy.load_state_dict(saved)
        return bad

    def _aggregate_head(self, updates: list[Update], weights: list[float]) -> dict[str, np.ndarray] | None:
        if not updates or not updates[0].head:
            return None
        return {k: weighted_mean([u.head[k] for u in updates], weights).astype(np.float32) for k in updates[0].head}

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
        return {
            "round": self.round,
            "client_ranks": list(self.client_ranks),
            "head": dict(self.head),
            "base_delta": dict(self.base_delta),
            "downlinks": {r: dict(f) for r, f in self._downlinks.items()},
            "base_nbytes": self._base_nbytes,
            "fresh": self._fresh,
            "rng": self.rng.bit_generator.state,
            "privacy": dict(self.privacy),
            "mechanism": self.mechanism.state_dict(),
            "strategy": self.strategy.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.round = int(state["round"])
        self.client_ranks = [int(r) for r in state["client_ranks"]]
        self.head = state["head"]
        self.base_delta = state["base_delta"]
        self._downlinks = {int(r): f for r, f in state["downlinks"].items()}
        self._base_nbytes = int(state.get("base_nbytes", 0))
        self._fresh = bool(state["fresh"])
        self.rng.bit_generator.state = state["rng"]
        self.privacy = {int(c): rep for c, rep in state["privacy"].items()}
        self.mechanism.load_state_dict(state.get("mechanism", {}))
        self.strategy.load_state_dict(state["strategy"])
