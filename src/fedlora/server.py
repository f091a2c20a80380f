"""The server's state between rounds and the entry to its round pipeline (`fedlora.round`): sample clients,
build each client's downlink for its rank, finish a round from the clients' replies (or a secure sum).

The server trusts nothing a client sends: the pipeline's first stage checks every reply against the server's own
state (`fedlora.round.validate`). `state_dict` holds everything needed to continue a run exactly, the privacy
mechanism's noise generator included (the checkpoint is the server's private state, never published).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fedlora import lora
from fedlora.config import ExperimentConfig
from fedlora.dp.mechanisms import make_mechanism
from fedlora.protocol import Downlink, RoundOutcome, SummedRound, Update
from fedlora.round import RoundContext, RoundPipeline
from fedlora.round.validate import update_defect
from fedlora.strategies import WIRE_BYTES, LoraFactors, Strategy
from fedlora.strategies.base import parts_nbytes


class Server:
    """Holds the global state between rounds: per-rank downlinks, head, merged deltas, client ranks."""

    def __init__(self, cfg: ExperimentConfig, strategy: Strategy, dims: dict[str, tuple[int, int]],
                 head: dict[str, np.ndarray], client_sizes: list[int]):
        self.cfg = cfg
        self.strategy = strategy
        self.dims = dims
        self.client_sizes = list(client_sizes)
        self.client_ranks = cfg.client_ranks()
        self.r_max = max(self.client_ranks)  # the federation's widest rank: client-level DP's fixed width
        self.plannable_ranks: set[int] = set()  # ranks a re-plan may assign (fedlora.flaas): downlinks kept for them
        self.round = 0
        self.head = head
        self.base_delta: dict[str, np.ndarray] = {}  # everything merged into the base weights so far
        # Round 1 starts from what every client can derive from the seed: the PEFT init (A seeded, B = 0), or the
        # method's own start from it (Fed-SB: fixed B0, R = 0).
        self.initial: dict[str, LoraFactors] = strategy.starting_factors(
            lora.initial_factors(cfg.seed, dims, self.r_max, cfg.lora.scale(self.r_max)))
        self._downlinks: dict[int, dict[str, LoraFactors]] = {}
        self._base_nbytes = 0  # bytes of the base deltas the last round added (sent with the next downlinks)
        self._fresh = True  # the downlinks are prefixes of the seeded init
        self.rng = np.random.default_rng([cfg.seed, 1])  # client sampling and simulated dropouts
        self.privacy: dict[int, dict] = {}  # last privacy report per client (accountant state, epsilon)
        self.mechanism = make_mechanism(cfg)  # privacy on the server side: none, sample-level or client-level
        # One pipeline for clients' replies, one for what secure aggregation delivers (a sum, or why there is none).
        self.pipelines = {secure: RoundPipeline(cfg, self.mechanism.clips_on_server, secure) for secure in (False, True)}

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

    def global_factors(self) -> dict[str, LoraFactors]:
        """The global adapter at the federation's widest rank (what the round started from)."""
        return self.downlink_factors(self.r_max)

    def sent_factors(self, client_id: int) -> dict[str, LoraFactors]:
        """The factors a client starts this round from (FLoRA: its fresh, seed-derived init)."""
        rank = self.expected_rank(client_id)
        return self.downlink_factors(rank) or lora.fresh_factors(self.cfg, self.dims, rank, self.round + 1, client_id)

    def reference(self, u: Update) -> tuple[dict[str, LoraFactors], dict[str, np.ndarray]]:
        """The factors and head the client started this round from."""
        return self.sent_factors(u.client_id), self.head

    def as_sent(self, u: Update) -> Update:
        """The update as the server may read it: the parts the client sends this round, every other part
        replaced by what the server itself sent (FFA's A, FedSA's B, which stays on the client)."""
        ref, parts = self.sent_factors(u.client_id), self.up_parts()
        factors = {}
        for n, f in u.factors.items():
            sent = {p: np.asarray(a, np.float32) for p, a in self.strategy.to_parts(n, f, parts).items()}
            factors[n] = self.strategy.from_parts(n, sent, ref[n])
        return replace(u, factors=factors)

    # -- rounds ----------------------------------------------------------------------------------
    def sample_clients(self) -> list[int]:
        """This round's clients: fixed-size sampling without replacement, or what the privacy mechanism needs
        (client-level DP: Poisson sampling, the model its accountant analyses)."""
        n = self.cfg.federation.num_clients
        sampled = self.mechanism.sample_clients(n, self.rng)
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
        """Why this update must be rejected, or None (the pipeline's first check, one client alone)."""
        return update_defect(self, u)

    def finish_round(self, updates: list[Update], sampled: list[int], *, summed: SummedRound | None = None,
                     failed: str | None = None) -> RoundOutcome:
        """Run the round pipeline on the clients' replies (or SecAgg's sum, or a sum that failed). Raises
        RoundFailed when the round cannot be used (too few valid updates, outside client-level DP)."""
        bytes_down = sum(self.downlink_nbytes(self.client_ranks[c]) for c in sampled)
        ctx = RoundContext(round=self.round + 1, sampled=list(sampled), updates=list(updates), summed=summed,
                           failed=failed)
        self.pipelines[summed is not None or failed is not None].run(self, ctx)
        if ctx.contributors and ctx.norms and "update_norms" not in ctx.extra:
            ctx.extra["update_norms"] = {str(u.client_id): ctx.norms[u.client_id] for u in ctx.contributors
                                         if u.client_id in ctx.norms}
        if summed is not None:
            ctx.extra.update(summed.extra)
        result = ctx.result
        return RoundOutcome(base_delta=dict(result.base_delta) if result is not None else {},
                            trained=sorted(u.client_id for u in ctx.contributors) if result is not None else [],
                            rejected=ctx.rejected, bytes_up=ctx.bytes_up, bytes_up_head=ctx.bytes_up_head,
                            bytes_down=bytes_down, extra=ctx.extra, release=ctx.release)

    def advance(self, result) -> None:
        """The commit's last step: the result's base deltas and downlinks become the global state, the round
        counter moves on (`result` None: a round that changed nothing)."""
        if result is not None:
            for name, d in result.base_delta.items():
                self.base_delta[name] = self.base_delta.get(name, 0) + d
            self._fresh = False
            ranks_needed = set(self.client_ranks) | {self.r_max} | self.plannable_ranks
            self._downlinks = {} if self.strategy.fresh_lora_each_round else \
                {r: result.downlink(r) for r in ranks_needed}
            self._base_nbytes = int(result.base_delta_nbytes())
        self.round += 1

    def global_eval_factors(self) -> tuple[int, dict[str, LoraFactors]]:
        """The global model's adapter: the downlink of the highest rank (zeros after a FLoRA merge)."""
        factors = self.downlink_factors(self.r_max)
        if not factors:
            init = lora.initial_factors(self.cfg.seed, self.dims, self.r_max, self.cfg.lora.scale(self.r_max))
            factors = {n: LoraFactors(A=f.A, B=np.zeros_like(f.B), scale=f.scale) for n, f in init.items()}
        return self.r_max, factors

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
