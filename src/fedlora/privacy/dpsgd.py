"""Sample-level DP-SGD on a (PEFT) model with Opacus, entered and left cheaply once per client per round.

Root cause of "No activations detected for Linear" with Opacus 1.6 + PEFT (``make_private`` on a
``PeftModelForSequenceClassification``): ``from_pretrained`` returns the base model in *eval* mode, and PEFT's
``ModulesToSaveWrapper`` builds the trainable head as ``copy.deepcopy(original_module)``, so the trainable
copy (``classifier.modules_to_save.default``) inherits ``training=False``. (The LoRA ``lora_A``/``lora_B``
Linears are freshly constructed, hence in train mode; the top-level ``PeftModel.training`` is True too, so
the model *looks* like it is training.) Opacus' forward hook skips saving activations of any module that is
not in training mode, but its backward hook still fires for that module because its weight requires grad,
and finds nothing: the error. It is not the frozen ``original_module`` copy; that one owns no trainable
parameter and gets no hook.

Fix: attach Opacus' ``GradSampleHooks`` in place (no wrapper module, no data loader, no privacy engine) and,
for the duration of the block only, put exactly the modules that own trainable parameters into training
mode. Those are layer types whose forward does not depend on the mode (Linear, Embedding, LayerNorm, ...);
every other module keeps its mode, so base-model dropout stays as the caller set it. Opacus hooks only
modules that own trainable parameters, so a frozen ``lora_A`` (FFA-LoRA) gets no hook and costs nothing,
and PEFT's ``lora.Linear`` wrapper (whose own parameters are all frozen base weights) is skipped while its
``lora_A``/``lora_B`` ``nn.Linear`` children inside ``ModuleDict``\\ s get Opacus' einsum Linear sampler
(3-D activations ``(batch, seq, r)`` are summed over ``seq`` by one batched matmul). Configurations that
cannot be made private (a trainable layer type without an Opacus grad sampler, a trainable layer with
buffers, a trainable parameter missing from the optimizer) raise ValueError naming the module; nothing
ever falls back to non-private training. (``model.train()`` before ``make_private`` would also avoid the
error, but it switches on the base model's dropout and ``make_private`` wants a data loader and a fresh
engine per round; the block below is entered per client per round in a few milliseconds.)

Client usage, once per client per round (sigma calibrated once for all rounds, one accountant per client)::

    with private_training(model, optimizer, noise_multiplier=sigma, clip=C, expected_batch_size=round(q * n),
                          generator=gen, accountant=acc, sample_rate=q) as (module, dp_opt):
        for idx in poisson_batches(n, q, local_steps, rng):
            if len(idx) == 0:
                noise_only_step(dp_opt)          # empty Poisson batch: still one noisy, accounted step
            else:
                module(**batch_of(idx)).loss.backward()   # mean-reduced loss
                dp_opt.step()
            dp_opt.zero_grad()
"""

from __future__ import annotations


import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import math

import numpy as np
import torch
from opacus.grad_sample import GradSampleHooks
from opacus.optimizers import DPOptimizer

# Opacus' own step helpers (private names, pinned by opacus==1.6.*): reusing them keeps the processed-flag
# bookkeeping and the secure-mode noise exactly as in DPOptimizer.
from opacus.optimizers.optimizer import _check_processed_flag, _generate_noise, _mark_as_processed
from torch import nn

from .accountant import ClientAccountant, validate_privacy_params
from fedlora.errors import UserError

__all__ = ["GroupClipDPOptimizer", "modules_to_hook", "noise_only_step", "poisson_batches", "private_training"]

# Layer types whose forward is the same in train and eval mode (once layers with buffers are refused), so
# switching them to training mode for Opacus changes nothing but the hooks' behaviour.
_MODE_FREE_TYPES: tuple[type[nn.Module], ...] = tuple(
    t
    for t in (
        nn.Linear,
        nn.Embedding,
        nn.LayerNorm,
        nn.GroupNorm,
        getattr(nn, "RMSNorm", None),
        nn.Conv1d,
        nn.Conv2d,
        nn.Conv3d,
    )
    if t is not None
)

# Opacus registers full backward hooks; on the first LoRA layer the input does not require grad (frozen
# embeddings), which is expected and harmless, but torch warns about it on every step.
warnings.filterwarnings(
    "ignore",
    message="Full backward hook is firing when gradients are computed with respect to module outputs",
    category=UserWarning,
)

# Attributes Opacus' hooks and DPOptimizer leave on modules/parameters; removed on exit.
_MODULE_ATTRS = ("activations", "max_batch_len", "ft_compute_sample_grad")
_PARAM_ATTRS = ("grad_sample", "_forward_counter", "_current_grad_sample", "_norm_sample", "summed_grad")


class GroupClipDPOptimizer(DPOptimizer):
    """DP-SGD with group-wise clipping: each parameter group has its own per-example bound and its own noise.

    Group g's part of every example's gradient is clipped to C_g, and N(0, (sigma*sqrt(G)*C_g)^2) is added to
    that group's sum. Scaling group g by 1/(sigma*sqrt(G)*C_g) turns this into one Gaussian mechanism with unit
    noise and per-example sensitivity sqrt(sum_g 1/(G*sigma^2)) = 1/sigma, i.e. noise multiplier sigma; the
    released gradient is an invertible linear map of that, so the accountant records (sigma, q) per step exactly
    as for flat clipping. What changes is where the noise goes: a group whose gradients are small (LoRA factors
    beside a classifier head) gets a small bound and noise to match, instead of the head-sized noise of a single
    bound. Opacus' per-layer mode keeps one noise level for all, so this is written here.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, groups: list[tuple[list[nn.Parameter], float]], **kwargs):
        clips = [float(c) for _, c in groups]
        if any(not (c > 0 and math.isfinite(c)) for c in clips):
            raise ValueError(f"group clip bounds must be finite and > 0, got {clips}")
        # max_grad_norm = the flat-equivalent bound (only used by Opacus for bookkeeping we override).
        super().__init__(optimizer, max_grad_norm=math.sqrt(sum(c * c for c in clips)), **kwargs)
        self.group_of = {id(p): g for g, (params, _) in enumerate(groups) for p in params}
        missing = [i for i, p in enumerate(self.params) if id(p) not in self.group_of]
        if missing:
            raise ValueError(f"{len(missing)} trainable parameter(s) belong to no clipping group")
        self.group_clips = clips

    def clip_and_accumulate(self) -> None:
        n = len(self.grad_samples[0])
        sq = [self.grad_samples[0].new_zeros(n) for _ in self.group_clips]
        for p, g in zip(self.params, self.grad_samples):
            sq[self.group_of[id(p)]] += g.flatten(start_dim=1).pow(2).sum(dim=1)  # n = 0: an empty Poisson batch
        factors = [(c / (s.sqrt() + 1e-6)).clamp(max=1.0) for s, c in zip(sq, self.group_clips)]
        for p in self.params:
            _check_processed_flag(p.grad_sample)
            grad_sample = self._get_flat_grad_sample(p).to(p.dtype)
            grad = torch.einsum("i,i...", factors[self.group_of[id(p)]].to(p.dtype), grad_sample)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)

    def add_noise(self) -> None:
        scale = self.noise_multiplier * math.sqrt(len(self.group_clips))
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            std = scale * self.group_clips[self.group_of[id(p)]]
            noise = _generate_noise(std=std, reference=p.summed_grad, generator=self.generator,
                                    secure_mode=self.secure_mode)
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)


def poisson_batches(n: int, sample_rate: float, steps: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Poisson-sampled index batches: each of ``n`` examples is in each batch independently with prob q.

    Batches may be empty; the client must then take a noise-only step (see :func:`noise_only_step`),
    because the accountant assumes exactly this sampling and one noisy step per batch.
    """
    if n < 0 or not (0 < sample_rate <= 1) or steps < 0:
        raise ValueError(f"poisson_batches needs n >= 0, 0 < sample_rate <= 1, steps >= 0; got {n}, {sample_rate}, {steps}")
    return [np.flatnonzero(rng.random(n) < sample_rate) for _ in range(steps)]


def modules_to_hook(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that directly own a trainable parameter: exactly the ones Opacus hooks.

    Raises ValueError naming the first module for which per-sample gradients cannot be computed safely.
    """
    found = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if type(module) not in GradSampleHooks.GRAD_SAMPLERS:
            raise UserError(
                f"cannot make module '{name}' ({type(module).__name__}) private: Opacus has no per-sample "
                "gradient for this layer type; freeze it or use a supported LoRA configuration"
            )
        if any(True for _ in module.buffers(recurse=False)):
            raise UserError(f"cannot make module '{name}' ({type(module).__name__}) private: it has buffers")
        if not module.training and not isinstance(module, _MODE_FREE_TYPES):
            raise ValueError(
                f"cannot make module '{name}' ({type(module).__name__}) private: it is in eval mode and its "
                "forward may depend on the mode; call model.train() first"
            )
        found.append((name, module))
    return found


def _check_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    if isinstance(optimizer, DPOptimizer):
        raise ValueError("private_training needs the plain optimizer, not a DPOptimizer")
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for name, p in model.named_parameters():
        # A trainable parameter outside the optimizer would still receive a raw, unclipped gradient.
        if p.requires_grad and id(p) not in in_optimizer:
            raise ValueError(f"trainable parameter '{name}' is not in the optimizer; freeze it or add it")


@contextmanager
def private_training(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    noise_multiplier: float,
    clip: float,
    expected_batch_size: int,
    generator: torch.Generator | None = None,
    accountant: ClientAccountant | None = None,
    sample_rate: float | None = None,
    secure_mode: bool = False,
    clip_groups: list[tuple[list[nn.Parameter], float]] | None = None,
) -> Iterator[tuple[nn.Module, DPOptimizer]]:
    """DP-SGD for the block: yields ``(module_to_call, dp_optimizer)``.

    Inside, per step: ``out = module_to_call(**batch)``; ``out.loss.backward()`` (mean-reduced loss);
    ``dp_optimizer.step()``; ``dp_optimizer.zero_grad()``. For an empty Poisson batch call
    ``noise_only_step(dp_optimizer)`` then ``dp_optimizer.zero_grad()`` instead of the forward/backward.
    Each example's gradient over all trainable parameters jointly is clipped to ``clip``, the clipped
    gradients are summed, N(0, (noise_multiplier*clip)^2) is added and the result divided by
    ``expected_batch_size`` (Opacus DPOptimizer semantics), then the wrapped optimizer steps.

    With ``clip_groups`` (``[(params, bound), ...]`` covering every trainable parameter) each group is clipped
    to its own bound and noised to match (:class:`GroupClipDPOptimizer`); ``clip`` is then unused.

    With ``accountant`` and ``sample_rate`` given, every step taken (noise-only ones included) is recorded.
    On exit (normal or exception) every hook and attribute Opacus added is removed, module modes are
    restored, and ``.grad`` of trainable parameters is set to None (a leftover raw gradient would be
    non-private). Do not evaluate inside the block.
    """
    validate_privacy_params(clip=clip, noise_multiplier=noise_multiplier)
    if int(expected_batch_size) != expected_batch_size or expected_batch_size < 1:
        raise ValueError(f"expected_batch_size must be an integer >= 1, got {expected_batch_size!r}")
    if (accountant is None) != (sample_rate is None):
        raise ValueError("private_training needs both accountant and sample_rate, or neither")
    hooked = modules_to_hook(model)
    if not hooked:
        raise ValueError("private_training: the model has no trainable parameters")
    _check_optimizer(model, optimizer)

    modes = [(m, m.training) for _, m in hooked]
    params = [p for p in model.parameters() if p.requires_grad]
    hooks: GradSampleHooks | None = None
    dp_optimizer: DPOptimizer | None = None
    try:
        for m, _ in modes:
            m.training = True  # only this module, not its children (see module docstring)
        hooks = GradSampleHooks(model, batch_first=True, loss_reduction="mean", strict=True)
        common = dict(noise_multiplier=noise_multiplier, expected_batch_size=int(expected_batch_size),
                      loss_reduction="mean", generator=generator, secure_mode=secure_mode)
        if clip_groups is not None:
            dp_optimizer = GroupClipDPOptimizer(optimizer, groups=clip_groups, **common)
        else:
            dp_optimizer = DPOptimizer(optimizer, max_grad_norm=clip, **common)
        if accountant is not None:
            sigma, q = float(noise_multiplier), float(sample_rate)
            dp_optimizer.attach_step_hook(lambda _opt: accountant.step(sigma, q))
        yield model, dp_optimizer
    finally:
        if hooks is not None:
            hooks.cleanup()
        for m, training in modes:
            m.training = training
            for attr in _MODULE_ATTRS:
                if hasattr(m, attr):
                    delattr(m, attr)
        for p in params:
            p.grad = None
            for attr in _PARAM_ATTRS:
                if hasattr(p, attr):
                    delattr(p, attr)


def noise_only_step(dp_optimizer: DPOptimizer) -> None:
    """DP step for an empty Poisson batch: the update is pure noise N(0, (sigma*C)^2) / expected_batch_size.

    Same as what Opacus does when its Poisson data loader yields an empty batch, without running the model
    on zero rows. Call ``dp_optimizer.zero_grad()`` afterwards as after any step.
    """
    for p in dp_optimizer.params:
        if getattr(p, "grad_sample", None) is not None:
            raise ValueError("noise_only_step: per-sample gradients are pending; call dp_optimizer.zero_grad() first")
        p.grad_sample = p.new_zeros((0, *p.shape))
    dp_optimizer.step()
