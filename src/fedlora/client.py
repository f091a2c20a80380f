"""ClientTrainer: from a downlink (factors of the client's rank + head), train locally, return an Update.

The same trainer runs in-process (engines/local.py) and inside a Flower ClientApp (engines/flower.py).
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from fedlora import lora
from fedlora.client_state import ClientStateStore
from fedlora.config import ExperimentConfig
from fedlora.devices import model_device, to_device
from fedlora.encoding import EncodedData, collate, encode  # noqa: F401  (re-exported)
from fedlora.host import ModelHost
from fedlora.lora import fresh_factors  # noqa: F401  (re-exported)
from fedlora.micro_batches import default_budget, length_chunks
from fedlora.protocol import Downlink, Update  # noqa: F401  (re-exported)
from fedlora.strategies import LoraFactors, Strategy


def shuffled_batches(n: int, batch_size: int, steps: int, rng: np.random.Generator,
                     lengths: list[int] | None = None) -> list[np.ndarray]:
    """`steps` batches from reshuffled passes over the client's data (no example twice in one pass).

    With `lengths` (federation.batching = "length-buckets"), the round's examples are the same ones, regrouped:
    sorted by length, cut into `steps` batches of similar lengths, and those batches taken in random order, so
    a batch padded to its longest row wastes little. The regrouping draws from `rng` after the examples are
    drawn, so which examples a round sees does not depend on it."""
    out: list[np.ndarray] = []
    order = np.empty(0, dtype=np.int64)
    while len(out) < steps:
        if len(order) < min(batch_size, n):
            order = np.concatenate([order, rng.permutation(n)])
        out.append(order[:batch_size])
        order = order[batch_size:]
    if lengths is None:
        return out
    drawn = np.concatenate(out)
    by_length = drawn[np.argsort([lengths[i] for i in drawn], kind="stable")]
    cuts = np.cumsum([len(b) for b in out])[:-1]
    grouped = np.split(by_length, cuts)
    return [grouped[i] for i in rng.permutation(len(grouped))]


def round_batches(data: EncodedData, cfg: ExperimentConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """A client's non-private batches for one round, as `federation.batching` asks."""
    lengths = [len(x) for x in data.input_ids] if cfg.federation.batching == "length-buckets" else None
    return shuffled_batches(len(data), cfg.federation.batch_size, cfg.federation.local_steps, rng, lengths)


@dataclass
class TrainingSession:
    """What one client's local training runs on: its batches, the module that runs them, the optimizer."""

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batches: list[np.ndarray]
    set_to_none: bool = True
    # DP-SGD: each batch runs as length-grouped micro-batches whose clipped per-example gradients add up before
    # the batch's one noisy step (`accumulate` after each piece but the last; see fedlora.dp.sample).
    micro_batched: bool = False

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=self.set_to_none)

    def empty_step(self) -> None:
        raise RuntimeError("an empty batch outside DP-SGD")  # shuffled batches are never empty

    def accumulate(self) -> None:
        raise RuntimeError("micro-batches outside DP-SGD")


@contextmanager
def plain_session(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: EncodedData,
                  cfg: ExperimentConfig, rng: np.random.Generator) -> Iterator[TrainingSession]:
    """Non-private training: reshuffled passes over the client's data."""
    yield TrainingSession(model, optimizer, round_batches(data, cfg, rng))


def make_optimizer(
    cfg: ExperimentConfig, params: list[torch.nn.Parameter], head: list[torch.nn.Parameter] = ()
) -> torch.optim.Optimizer:
    """The clients' optimizer over `params`; those also in `head` get `head_lr` when it is set."""
    opt = cfg.local_optim()
    head_ids = {id(p) for p in head} if opt.head_lr is not None else set()
    groups = [{"params": [p for p in params if id(p) not in head_ids]}]
    if head_ids:
        groups.append({"params": [p for p in params if id(p) in head_ids], "lr": opt.head_lr})
    groups = [g for g in groups if g["params"]]
    if opt.name == "sgd":
        return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    return torch.optim.AdamW(groups, lr=opt.lr, weight_decay=opt.weight_decay)


class ClientTrainer:
    """Trains one client's adapter on the shared model host.

    What a client keeps between rounds and never sends (the method's `personal` parts: FedSA's B) lives in
    `store`, keyed by client and round; engines give it a folder that survives a resume. Nothing else is kept."""

    def __init__(self, cfg: ExperimentConfig, host: ModelHost, strategy: Strategy,
                 store: ClientStateStore | None = None):
        self.cfg = cfg
        self.host = host
        self.strategy = strategy
        self.store = store if store is not None else ClientStateStore()
        self.pad_id = host.tokenizer.pad_token_id or 0
        self.dims = lora.module_dims(host.model)
        self.task = host.task
        # Padded tokens per DP-SGD micro-batch: None, the device's default; 0, each Poisson batch in one forward
        # padded to its longest row (the path before micro-batching, kept for benchmarks and tests).
        self.dp_tokens_per_chunk: int | None = None

    def start_factors(self, down: Downlink, client_id: int) -> tuple[dict[str, LoraFactors], dict[str, np.ndarray]]:
        """(factors in the client's own scale, head) the client starts the round from: the downlink, a fresh LoRA
        (FLoRA), and the client's own personal parts (FedSA's B) where it kept some."""
        rank = down.rank
        factors = down.factors or fresh_factors(self.cfg, self.dims, rank, down.round, client_id)
        factors = lora.with_scale(factors, self.cfg.lora.scale(rank))
        personal = self.strategy.roles(down.round).personal
        if personal:
            kept = self.store.load(client_id, before_round=down.round)
            if kept:  # a client's first round starts from the downlink's init
                factors = {m: self.strategy.from_parts(m, {p: kept[personal_key(m, p)] for p in personal}, f)
                           for m, f in factors.items()}
        return factors, down.head

    def load(self, down: Downlink, client_id: int) -> str:
        """Put the client's starting point into the adapter of its rank; return the adapter name."""
        adapter = self.host.ensure_rank(down.rank)
        factors, head = self.start_factors(down, client_id)
        lora.set_factors(self.host.model, adapter, factors)
        if head:
            lora.set_head(self.host.model, adapter, head)
        return adapter

    def save_personal(self, client_id: int, round_idx: int, factors: dict[str, LoraFactors]) -> None:
        personal = self.strategy.roles(round_idx).personal
        if personal:
            self.store.save(client_id, round_idx, {personal_key(m, p): a for m, f in factors.items()
                                                   for p, a in self.strategy.to_parts(m, f, personal).items()})

    def train(self, client_id: int, down: Downlink, data: EncodedData, dp=None) -> Update:
        """Local training. `dp` (the client state of `dp.SampleLevelDP`) trains with DP-SGD and its accountant."""
        adapter = self.load(down, client_id)
        roles = self.strategy.roles(down.round)
        model = self.host.model
        # Fed-SB trains only the r x r core R of A = R·A0: lora_A is parametrized for the length of the training.
        core = lora.trained_through_core(model, adapter, self.strategy.core_basis()) if "R" in roles.train \
            else nullcontext()
        with core:
            losses, samples, train_s, tail_before = self._train_loop(adapter, roles, client_id, down, data, dp)
        factors = lora.get_factors(model, adapter)
        self.save_personal(client_id, down.round, factors)
        next_rank = None
        if tail_before is not None:
            next_rank = self.strategy.pruned_rank(down.rank, tail_before, self._tail_norm(adapter))
        return Update(
            client_id=client_id,
            rank=down.rank,
            factors=factors,
            head=lora.get_head(model, adapter),
            num_examples=len(data),
            train_loss=float(np.mean(losses)) if losses else float("nan"),
            steps=len(losses),
            samples=samples,
            train_s=train_s,
            next_rank=next_rank,
            privacy=dp.report() if dp is not None else {},
        )

    def _train_loop(self, adapter: str, roles, client_id: int, down: Downlink, data: EncodedData,
                    dp) -> tuple[list[float], int, float, float | None]:
        """The local steps: (losses, samples, seconds, HetLoRA's tail norm before training or None)."""
        cfg = self.cfg
        train_A = "A" in roles.train or "R" in roles.train
        params = self.host.activate(down.rank, train_A=train_A, train_B="B" in roles.train)
        head = [p for n, p in self.host.model.named_parameters() if p.requires_grad and ".modules_to_save." in n]
        optimizer = make_optimizer(cfg, params, head)
        rng = np.random.default_rng([cfg.seed, down.round, client_id])
        model = self.host.model
        # The strategy's client-side hooks (HetLoRA: a tail penalty, then self-pruning). Under DP-SGD only the
        # clipped, noised data gradient is used, so the penalty is off.
        penalty = self.strategy.client_penalty if dp is None else 0.0
        tail_before = self._tail_norm(adapter) if self.strategy.clients_change_rank else None

        start = time.perf_counter()
        losses: list[float] = []
        samples = 0
        # The one local training loop, whatever the privacy mode: the session decides the batches, the module
        # that runs them and the optimizer (DP-SGD: Poisson batches, Opacus' per-example clipping and noise).
        opened = dp.session(cfg, model, optimizer, len(data), rng, down.round, client_id) if dp is not None \
            else plain_session(model, optimizer, data, cfg, rng)
        with opened as session:
            for idx in session.batches:
                if len(idx) == 0:
                    session.empty_step()  # an empty Poisson batch still takes a (noise-only) step
                    continue
                pieces = self._pieces(data, idx) if session.micro_batched else [idx]
                total = 0.0
                for i, piece in enumerate(pieces):
                    batch = to_device(self.task.collate(data, piece, self.pad_id), self.host.device)
                    loss = self.task.loss(session.module, batch)
                    if penalty:
                        loss = loss + self._tail_penalty(adapter)
                    loss.backward()
                    if i < len(pieces) - 1:
                        session.accumulate()  # clip this piece's examples into the batch's sum; no step yet
                    else:
                        session.optimizer.step()
                    session.zero_grad()
                    value = float(loss.detach())
                    total += value * len(piece)
                losses.append(value if len(pieces) == 1 else total / len(idx))
                samples += len(idx)
        train_s = time.perf_counter() - start
        for p in params:
            p.requires_grad_(False)
        return losses, samples, train_s, tail_before

    def _pieces(self, data: EncodedData, idx: np.ndarray) -> list[np.ndarray]:
        """The micro-batches of one DP-SGD batch: its rows by length, cut to the token budget."""
        budget = self.dp_tokens_per_chunk
        if budget == 0:
            return [idx]
        budget = budget or default_budget(self.host.device.type)
        return [idx[c] for c in length_chunks([len(data.input_ids[i]) for i in idx], budget)]

    # The tail penalty (HetLoRA): on the tail slots of the factors, so a client can prune its own rank.
    def _tail_norm(self, adapter: str) -> float:
        f = lora.get_factors(self.host.model, adapter)
        return float(sum(self.strategy.tail_norm(x.A, x.B) for x in f.values()))

    def _tail_penalty(self, adapter: str) -> torch.Tensor:
        total = torch.zeros((), device=self.host.device)
        for layer in lora.lora_layers(self.host.model).values():
            A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            keep = self.strategy.kept_slots(A.shape[0])
            total = total + B[:, keep:].norm() * A[keep:, :].norm()
        return self.strategy.client_penalty * total


def personal_key(module: str, part: str) -> str:
    """The store key of a personal part (FedSA's B) of one module."""
    return f"personal/{module}.{part}"


def client_round(trainer: "ClientTrainer", client_id: int, down: Downlink, data: EncodedData, dp=None) -> Update | str:
    """One client's round, the same on every engine: it sits out (returns why) when its next round would push
    its DP budget past the target; otherwise it trains and returns its update."""
    why = sits_out(trainer.cfg, dp)
    return why if why is not None else trainer.train(client_id, down, data, dp=dp)


def sits_out(cfg: ExperimentConfig, dp) -> str | None:
    """Why a client with DP-SGD state `dp` sits this round out (its budget), or None when it trains."""
    if dp is not None and not dp.can_train(cfg.local_steps()):
        return f"privacy budget exhausted (epsilon={dp.target_epsilon})"
    return None


def evaluate(host: ModelHost, adapter: str, data: EncodedData, batch_size: int) -> tuple[float, float]:
    """(mean loss, score) of the host's model with `adapter` active on `data`, as the run's task scores it."""
    host.model.set_adapter(adapter)
    return host.task.evaluate(host.model, data, batch_size, host.tokenizer.pad_token_id or 0)
