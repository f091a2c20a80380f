"""Batched clients: the clients of a round train together, one forward/backward over the union of their batches.

Why it is exact: the clients share the frozen base (and, for FFA, the frozen A), so they differ only in their
LoRA factors and head. Each client's factors are a slice of one stacked tensor; a forward hook on every LoRA
layer adds, to the rows of client k, s_k·(x·A_kᵀ)·B_kᵀ (FFA: x·Aᵀ is computed once for every row), and each
module of the head (one Linear or several layers) runs on client k's rows with client k's parameters. The loss
is Σ_k (mean loss over client k's rows), so the gradient on client k's slice is exactly the gradient of its own
batch loss. Adam/AdamW and SGD act element-wise, so one optimizer over the stacked tensors is K independent
optimizers with the same settings, each taking its own steps on its own batches (every client takes
`local_steps` steps). Mixed ranks are zero-padded to the widest: a padded slot has a zero A row and B column, so
both its gradients are exactly zero and it never moves.

DP-SGD clients train together in `batched_private` (per-example gradients, each client's own clipping, noise
and accountant). What it cannot keep exact, it refuses (`why_not_batched`), and the engine trains those rounds
one by one: a method's client-side penalty or self-pruning (HetLoRA), a core
trained through a parametrization (Fed-SB), parts kept on the client (FedSA).

PEFT has no multi-adapter-per-row training (its mixed-batch inference takes one adapter name per row and no
gradients through several adapters at once), so the routing is written here, on PEFT's own layers.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from fedlora import lora, micro_batches
from fedlora.client import ClientTrainer, Downlink, EncodedData, Update, make_optimizer, round_batches
from fedlora.micro_batches import length_chunks
from fedlora.models import to_device


def why_not_batched(trainer: ClientTrainer, round_idx: int, private: bool) -> str | None:
    """Why this round cannot train its clients together exactly, or None when it can. DP-SGD rounds
    (`private`) train together too, with each client's own clipping, noise and accountant
    (`batched_private`); they are refused for the same reasons as the others."""
    strategy = trainer.strategy
    roles = strategy.roles(round_idx)
    if strategy.client_penalty or strategy.clients_change_rank:
        return f"{strategy.name} adds a client-side penalty or prunes ranks"
    if "R" in roles.train:
        return f"{strategy.name} trains a core through a parametrized lora_A"
    if roles.personal:
        return f"{strategy.name} keeps parts on its clients"
    if trainer.cfg.model.gradient_checkpointing:
        return "gradient checkpointing recomputes the forward outside the routing hooks"
    return None


@dataclass
class Job:
    """One client's part of a batched round: its downlink, data, rank, this round's batches and its losses."""

    client_id: int
    down: Downlink
    data: EncodedData
    rank: int
    batches: list[np.ndarray]
    losses: list[float]


def concat(parts: list[EncodedData]) -> EncodedData:
    """One EncodedData holding the examples of several (the union batch of a step)."""
    ids = [x for p in parts for x in p.input_ids]
    labels = np.concatenate([p.labels for p in parts])
    prompt = None if parts[0].prompt_len is None else np.concatenate([p.prompt_len for p in parts])
    answers = None if parts[0].answers is None else [a for p in parts for a in p.answers]
    masks = None if parts[0].loss_mask is None else [m for p in parts for m in p.loss_mask]
    return EncodedData(ids, labels, prompt, answers, masks)


@dataclass
class Stacked:
    """A round's clients' LoRA factors and heads as stacked tensors on the host's device: client k is slice k,
    mixed ranks zero-padded to the widest. `shared` (FFA): the one frozen A every client's A is a prefix of."""

    adapter: str
    layers: dict
    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]
    head_wrappers: dict
    shared: dict[str, torch.Tensor] | None
    scales: torch.Tensor
    ranks: list[int]
    dtype: torch.dtype

    def params(self) -> list[torch.Tensor]:
        """What trains, in the order one-by-one training's optimizer holds it (each layer's A, B; then the head)."""
        return [t for m in self.layers for t in (self.A[m], self.B[m]) if t.requires_grad] + list(self.head.values())

    def update(self, tr: ClientTrainer, k: int, job: "Job", **fields) -> Update:
        """Client k's update: its own slice of the stacked tensors, in its own rank."""
        cfg = tr.cfg
        factors = {m: lora.LoraFactors(A=_numpy(self.A[m][k, : job.rank]), B=_numpy(self.B[m][k, :, : job.rank]),
                                       scale=cfg.lora.scale(job.rank)) for m in self.layers}
        return Update(client_id=job.client_id, rank=job.rank, factors=factors,
                      head={name: _numpy(t[k]) for name, t in self.head.items()}, num_examples=len(job.data),
                      **fields)


def stack_clients(tr: ClientTrainer, jobs: list[Job]) -> Stacked:
    """The jobs' starting factors and heads stacked; `requires_grad` says what the round's roles train."""
    cfg, host, model, device = tr.cfg, tr.host, tr.host.model, tr.host.device
    roles = tr.strategy.roles(jobs[0].down.round)
    width = max(j.rank for j in jobs)
    adapter = host.ensure_rank(width)  # only for its module set and dtype: its weights are not touched
    model.set_adapter(adapter)
    layers = lora.lora_layers(model)
    starts = [tr.start_factors(j.down, j.client_id) for j in jobs]
    dtype = next(iter(layers.values())).lora_A[adapter].weight.dtype
    A, B = {}, {}
    for m in layers:
        A[m] = torch.zeros((len(jobs), width, tr.dims[m][1]), dtype=dtype, device=device)
        B[m] = torch.zeros((len(jobs), tr.dims[m][0], width), dtype=dtype, device=device)
        for k, (j, (factors, _)) in enumerate(zip(jobs, starts)):
            A[m][k, : j.rank] = torch.as_tensor(factors[m].A, dtype=dtype)
            B[m][k, :, : j.rank] = torch.as_tensor(factors[m].B, dtype=dtype)
        A[m].requires_grad_("A" in roles.train)
        B[m].requires_grad_("B" in roles.train)
    # FFA: every client's A is a prefix of one frozen A; x·Aᵀ is then computed once for all rows and each
    # client reads its first r_k columns.
    shared = {m: _widest(A[m], jobs) for m in layers}
    if "A" in roles.train or not all(torch.equal(A[m][k, : j.rank], shared[m][: j.rank])
                                     for m in layers for k, j in enumerate(jobs)):
        shared = None
    scales = torch.tensor([cfg.lora.scale(j.rank) for j in jobs], dtype=dtype, device=device)
    head_wrappers = lora.head_wrappers(model, adapter) if starts[0][1] else {}
    head = {name: torch.stack([torch.as_tensor(h[name], device=device) for _, h in starts]).to(dtype)
            for name in starts[0][1]}
    for t in head.values():
        t.requires_grad_(True)
    return Stacked(adapter, layers, A, B, head, head_wrappers, shared, scales, [j.rank for j in jobs], dtype)


class BatchedRound:
    """Trains the clients of one round together on the trainer's model host; returns their updates."""

    def __init__(self, trainer: ClientTrainer, tokens_per_chunk: int | None = None):
        self.trainer = trainer
        self.tokens_per_chunk = tokens_per_chunk

    def train(self, clients: list[tuple[int, Downlink, EncodedData]]) -> list[Update]:
        tr, cfg = self.trainer, self.trainer.cfg
        model, device = tr.host.model, tr.host.device
        jobs = []
        for cid, down, data in clients:
            rng = np.random.default_rng([cfg.seed, down.round, cid])  # the batches one-by-one training draws
            jobs.append(Job(cid, down, data, down.rank, round_batches(data, cfg, rng), []))
        st = stack_clients(tr, jobs)
        dtype = st.dtype
        optimizer = make_optimizer(cfg, st.params(), list(st.head.values()))

        start = time.perf_counter()
        steps = len(jobs[0].batches)
        # The union of a step's batches is cut into length-grouped chunks; gradients accumulate over them.
        budget = self.tokens_per_chunk or micro_batches.default_budget(device.type)
        with _routed(model, st) as segments:
            for s in range(steps):
                parts = [j.data.subset(j.batches[s]) for j in jobs]
                sizes = np.array([len(p) for p in parts])
                union = concat(parts)
                owner = np.repeat(np.arange(len(jobs)), sizes)
                # Each client's loss is the mean over its own rows: row i weighs 1 / n_owner(i) in the sum.
                weight = torch.as_tensor(1.0 / sizes[owner], dtype=dtype, device=device)
                losses = np.zeros(len(jobs))
                for chunk in length_chunks([len(x) for x in union.input_ids], budget):
                    chunk = chunk[np.argsort(owner[chunk], kind="stable")]  # each client's rows contiguous
                    batch = to_device(tr.task.collate(union, chunk, tr.pad_id), device)
                    counts = np.bincount(owner[chunk], minlength=len(jobs))
                    edges = np.concatenate([[0], np.cumsum(counts)])
                    segments[:] = [(k, int(edges[k]), int(edges[k + 1])) for k in range(len(jobs)) if counts[k]]
                    per_example = tr.task.loss_per_example(model, batch)
                    (per_example * weight[chunk]).sum().backward()
                    np.add.at(losses, owner[chunk], per_example.detach().double().cpu().numpy() / sizes[owner[chunk]])
                for j, loss in zip(jobs, losses):
                    j.losses.append(float(loss))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        train_s = time.perf_counter() - start
        # The round's time, shared: the clients ran as one.
        return [st.update(tr, k, j, train_loss=float(np.mean(j.losses)), steps=steps,
                          samples=int(sum(len(b) for b in j.batches)), train_s=train_s / len(jobs))
                for k, j in enumerate(jobs)]


def _widest(A: torch.Tensor, jobs: list[Job]) -> torch.Tensor:
    return A[max(range(len(jobs)), key=lambda k: jobs[k].rank)]


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32).cpu().numpy().copy()


@contextmanager
def _routed(model, st: Stacked) -> Iterator[list[tuple[int, int, int]]]:
    """While inside, PEFT's own adapter path is off and hooks add to each row the LoRA term of the client that owns
    it (and apply that client's head). The yielded list holds (client, first row, end row) segments of the next
    forward; set it before each one. Client k uses only its own r_k slots, so its padded slots get no gradient.
    Segments are contiguous slices: each client's term is one matmul on its rows, no per-row gathers."""
    A, B, shared, ranks, scales, head = st.A, st.B, st.shared, st.ranks, st.scales, st.head
    segments: list[tuple[int, int, int]] = []
    handles = []

    def lora_hook(name):
        def hook(module, inputs, output):
            x = inputs[0].to(A[name].dtype)
            h_all = x @ shared[name].T if shared is not None else None  # FFA: one x·Aᵀ for every row
            terms = []
            for k, lo, hi in segments:
                r = ranks[k]
                h = h_all[lo:hi, ..., :r] if h_all is not None else x[lo:hi] @ A[name][k, :r].T
                terms.append((h @ B[name][k, :, :r].T) * scales[k])
            return output + torch.cat(terms).to(output.dtype)
        return hook

    def head_hook(name, wrapper):
        # Client k's rows go through this head module (one Linear, or layers such as RoBERTa's dense + out_proj)
        # with client k's parameters: torch.func.functional_call runs the module itself with them.
        module_copy = next(iter(wrapper.modules_to_save.values()))
        own = {p: head[f"{name}.{p}"] for p, _ in module_copy.named_parameters()}
        dtype = next(iter(own.values())).dtype

        def hook(module, inputs, output):
            x = inputs[0].to(dtype)
            outs = [torch.func.functional_call(module_copy, {p: t[k] for p, t in own.items()}, (x[lo:hi],))
                    for k, lo, hi in segments]
            return torch.cat(outs).to(output.dtype)
        return hook

    model.base_model.disable_adapter_layers()  # PEFT's own LoRA and head copies are bypassed
    try:
        for name, layer in st.layers.items():
            handles.append(layer.register_forward_hook(lora_hook(name)))
        for name, wrapper in st.head_wrappers.items():
            handles.append(wrapper.register_forward_hook(head_hook(name, wrapper)))
        yield segments
    finally:
        for h in handles:
            h.remove()
        model.base_model.enable_adapter_layers()
