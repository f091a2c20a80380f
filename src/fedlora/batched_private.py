"""Batched DP-SGD clients: a round's DP-SGD clients train in one forward/backward, each exactly as it would alone.

Per client, nothing of the mechanism changes: its own Poisson batches (the rows its accountant analyses, drawn
from the same generator as one-by-one training), every example's gradient clipped to the client's bound (per
group under `privacy.clipping = "group"`, as `privacy.dpsgd.GroupClipDPOptimizer`), the clipped sum noised with
the client's own generator (the same draws, in the same order and shapes, as Opacus' DPOptimizer one by one),
divided by the expected batch size, one optimizer step, its own accountant charged (sigma, q) for every step,
empty batches included. Only the work is shared: the union of the clients' batches at a step is cut into
length-grouped micro-batches, and every row runs through its own client's factors and head.

Per-example gradients: each hook gathers, for the rows of the forward, per-row copies of their owners' factors
and head parameters, detached from the stacked tensors and made autograd leaves. The backward of the sum of the
per-example losses then leaves in each copy's `.grad` the gradient of that row's own loss (a row touches only
its own copy, hence only its own client's factors), which is what Opacus' hooks compute one by one, without the
summed gradient Opacus' autograd also computes. Ghost clipping (norms from activations and output gradients,
then a second backward) does not pay here: for a LoRA B of d_out x r on T tokens the per-example gradient costs
T·d_out·r and its ghost norm T²·(d_out + r), about 4x more at r = 8, T = 30, d_out = 384, plus the second
backward; the materialised per-example gradients are small because r is.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from opacus.optimizers.optimizer import _generate_noise  # Opacus' own noise draw, as DPOptimizer makes it

from fedlora import micro_batches
from fedlora.batched import Stacked, Job, concat, stack_clients
from fedlora.client import ClientTrainer, Downlink, EncodedData, Update, make_optimizer
from fedlora.micro_batches import length_chunks
from fedlora.models import to_device
from fedlora.privacy import modules_to_hook


class _Rows:
    """The routing of the next forward: the client owning each row, and the per-row leaves its hooks made."""

    def __init__(self, st: Stacked):
        self.st = st
        width = max(st.ranks)
        ranks = torch.tensor(st.ranks, device=st.scales.device)
        self.masks = (torch.arange(width, device=ranks.device)[None, :] < ranks[:, None]).to(st.dtype)
        self.owner = torch.zeros(0, dtype=torch.long)
        self.leaves: dict[tuple[str, str], torch.Tensor] = {}

    def route(self, owner: np.ndarray) -> None:
        self.owner = torch.as_tensor(owner, dtype=torch.long, device=self.st.scales.device)
        self.leaves = {}

    def gather(self, key: tuple[str, str], stacked: torch.Tensor) -> torch.Tensor:
        """The owners' slices of `stacked`, one per row; a leaf whose .grad will be per-example when it trains."""
        rows = stacked.detach()[self.owner]
        if stacked.requires_grad:
            rows.requires_grad_(True)
            self.leaves[key] = rows
        return rows


@contextmanager
def _routed_rows(model, st: Stacked, rows: _Rows) -> Iterator[None]:
    """While inside, PEFT's own adapter path is off and hooks add to each row its owner's LoRA term (and run its
    owner's head) through the per-row copies `rows.gather` makes. A client's padded rank slots are masked off, so
    they get neither signal nor gradient."""
    handles = []

    def lora_hook(name):
        def hook(module, inputs, output):
            x = inputs[0].to(st.dtype)
            x = x.reshape(x.shape[0], -1, x.shape[-1])  # (rows, tokens, d_in)
            if st.shared is not None:  # FFA: one x·Aᵀ for every row
                h = x @ st.shared[name].T
            else:
                h = torch.bmm(x, rows.gather(("A", name), st.A[name]).transpose(1, 2))
            h = h * rows.masks[rows.owner][:, None, :]
            b = rows.gather(("B", name), st.B[name])
            term = torch.bmm(h, b.transpose(1, 2)) * st.scales[rows.owner][:, None, None]
            return output + term.reshape(output.shape).to(output.dtype)
        return hook

    def head_hook(name, wrapper):
        module_copy = next(iter(wrapper.modules_to_save.values()))
        names = [p for p, _ in module_copy.named_parameters()]

        def one_row(params, x):
            return torch.func.functional_call(module_copy, params, (x.unsqueeze(0),)).squeeze(0)

        def hook(module, inputs, output):
            params = {p: rows.gather(("head", f"{name}.{p}"), st.head[f"{name}.{p}"]) for p in names}
            return torch.func.vmap(one_row)(params, inputs[0].to(st.dtype)).to(output.dtype)
        return hook

    model.base_model.disable_adapter_layers()
    try:
        for name, layer in st.layers.items():
            handles.append(layer.register_forward_hook(lora_hook(name)))
        for name, wrapper in st.head_wrappers.items():
            handles.append(wrapper.register_forward_hook(head_hook(name, wrapper)))
        yield
    finally:
        for h in handles:
            h.remove()
        model.base_model.enable_adapter_layers()


def trained_tensors(st: Stacked) -> list[tuple[tuple[str, str], torch.Tensor]]:
    """(key, stacked tensor) of everything that trains, in `Stacked.params` order (one-by-one noise order)."""
    out = [((part, m), t) for m in st.layers for part, t in (("A", st.A[m]), ("B", st.B[m])) if t.requires_grad]
    return out + [(("head", name), t) for name, t in st.head.items()]


def client_slice(key: tuple[str, str], t: torch.Tensor, k: int, rank: int) -> torch.Tensor:
    """Client k's own part of a stacked tensor, in its own rank (a view)."""
    part = key[0]
    return t[k, :rank] if part == "A" else t[k, :, :rank] if part == "B" else t[k]


class PrivateBatchedRound:
    """Trains a round's DP-SGD clients together; each client's `dp` state (`dp.SamplePrivacy`) is charged as if
    it had trained alone. Clients out of budget are the caller's to leave out (as `client.client_round` does)."""

    def __init__(self, trainer: ClientTrainer, tokens_per_chunk: int | None = None):
        self.trainer = trainer
        self.tokens_per_chunk = tokens_per_chunk

    def train(self, clients: list[tuple[int, Downlink, EncodedData, object]]) -> list[Update]:
        tr, cfg = self.trainer, self.trainer.cfg
        model, device = tr.host.model, tr.host.device
        jobs, states = [], []
        for cid, down, data, dp in clients:
            rng = np.random.default_rng([cfg.seed, down.round, cid])  # the batches one-by-one training draws
            jobs.append(Job(cid, down, data, down.rank, dp.batches(cfg, len(data), rng), []))
            states.append(dp)
        st = stack_clients(tr, jobs)
        self._check_private(st, jobs)
        trained = trained_tensors(st)
        optimizer = make_optimizer(cfg, st.params(), list(st.head.values()))
        clipper = _Clipper(cfg, st, states, trained)
        generators = [dp.noise_generator(j.down.round, j.client_id, device) for j, dp in zip(jobs, states)]
        expected = cfg.local_batch_size()
        budget = self.tokens_per_chunk or micro_batches.default_budget(device.type)
        rows = _Rows(st)

        start = time.perf_counter()
        with _routed_rows(model, st, rows):
            for s in range(len(jobs[0].batches)):
                parts = [j.data.subset(j.batches[s]) for j in jobs]
                sizes = np.array([len(p) for p in parts])
                union = concat(parts)
                owner = np.repeat(np.arange(len(jobs)), sizes)
                summed = {key: torch.zeros_like(t, requires_grad=False) for key, t in trained}
                losses = np.zeros(len(jobs))
                chunks = length_chunks([len(x) for x in union.input_ids], budget) if len(union) else []
                for chunk in chunks:
                    rows.route(owner[chunk])
                    per_example = tr.task.loss_per_example(model, to_device(tr.task.collate(union, chunk, tr.pad_id),
                                                                             device))
                    per_example.sum().backward()  # each row's leaves get the gradient of its own loss
                    clipper.clip_into(summed, rows)
                    np.add.at(losses, owner[chunk], per_example.detach().double().cpu().numpy())
                for k, (j, dp) in enumerate(zip(jobs, states)):
                    clipper.add_noise(summed, k, generators[k])
                    dp.accountant.step(float(dp.noise_multiplier), float(dp.sample_rate))  # empty batches too
                    if sizes[k]:
                        j.losses.append(float(losses[k] / sizes[k]))
                for key, t in trained:
                    t.grad = summed[key] / expected
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        train_s = time.perf_counter() - start
        return [st.update(tr, k, j, train_loss=float(np.mean(j.losses)) if j.losses else float("nan"),
                          steps=len(j.losses), samples=int(sum(len(b) for b in j.batches)),
                          train_s=train_s / len(jobs), privacy=dp.report())
                for k, (j, dp) in enumerate(zip(jobs, states))]

    def _check_private(self, st: Stacked, jobs: list[Job]) -> None:
        """Refuse what one-by-one DP-SGD refuses (a trained layer Opacus has no per-example gradient for, one
        with buffers): the same modules, made trainable for the check only."""
        roles = self.trainer.strategy.roles(jobs[0].down.round)
        params = self.trainer.host.activate(max(st.ranks), train_A="A" in roles.train, train_B="B" in roles.train)
        try:
            modules_to_hook(self.trainer.host.model)
        finally:
            for p in params:
                p.requires_grad_(False)


class _Clipper:
    """Each client's per-example clipping (flat, or per group as GroupClipDPOptimizer) and its noise."""

    def __init__(self, cfg, st: Stacked, states: list, trained: list):
        self.st, self.states, self.trained = st, states, trained
        device = st.scales.device
        if cfg.privacy.clipping == "group":  # as dp.sample.clip_groups: LoRA factors, then the head, if any
            groups = {"factors": cfg.privacy.lora_clip, "head": cfg.privacy.clip}
            self.group_of = {key: "head" if key[0] == "head" else "factors" for key, _ in trained}
            used = [g for g in groups if g in self.group_of.values()]
            self.bounds = {g: torch.full((len(states),), float(groups[g]), dtype=torch.float64, device=device)
                           for g in used}
            self.noise_scale = math.sqrt(len(used))
        else:
            self.group_of = {key: "all" for key, _ in trained}
            self.bounds = {"all": torch.tensor([float(dp.clip) for dp in states], dtype=torch.float64, device=device)}
            self.noise_scale = 1.0

    def clip_into(self, summed: dict, rows: _Rows) -> None:
        """Add this micro-batch's clipped per-example gradients to their owners' sums."""
        n, owner = len(rows.owner), rows.owner
        sq = {g: torch.zeros(n, dtype=self.st.dtype, device=owner.device) for g in self.bounds}
        grads = {key: rows.leaves[key].grad for key, _ in self.trained}
        for key, g in grads.items():
            sq[self.group_of[key]] += g.reshape(n, -1).pow(2).sum(dim=1)
        factor = {g: (self.bounds[g][owner].to(s.dtype) / (s.sqrt() + 1e-6)).clamp(max=1.0) for g, s in sq.items()}
        for key, g in grads.items():
            f = factor[self.group_of[key]]
            summed[key].index_add_(0, owner, g * f.view(n, *([1] * (g.dim() - 1))))

    def add_noise(self, summed: dict, k: int, generator: torch.Generator) -> None:
        """Client k's noise on its own slots: N(0, (sigma_k·sqrt(G)·C_g)²), drawn as Opacus draws it one by one."""
        sigma = float(self.states[k].noise_multiplier)
        rank = self.st.ranks[k]
        for key, _ in self.trained:
            std = sigma * self.noise_scale * float(self.bounds[self.group_of[key]][k])
            part = client_slice(key, summed[key], k, rank)
            part += _generate_noise(std=std, reference=part, generator=generator, secure_mode=False)
