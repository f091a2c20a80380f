"""What the classifier head can learn from each `model.pooling`, with the encoder frozen: a table.

For the default experiment's data (5 Dirichlet clients, the fixed held-out split) it embeds every sentence once
with the embedded MiniLM, then, per pooling:
- a centralized ridge probe (closed form, the best a linear head can do on frozen features);
- the head alone trained federatedly under sample-level DP-SGD at epsilon 3 (the default DP recipe's batch,
  steps, clip and head optimizer, sigma calibrated per client as fedlora does), median over seeds;
- at the start of FFA-LoRA training, the median per-example gradient norm of the head and of LoRA B (what
  DP-SGD's per-example clipping shares out).
The DP head is simulated in NumPy on the cached features (softmax-regression gradients are closed form), so
the whole table takes a few minutes. Usage: python bench/bench_pooling.py [--seeds 3]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from fedlora.client import collate
from fedlora.config import load_config
from fedlora.experiment import prepare_data
from fedlora.host import ModelHost, load_base_model, load_tokenizer
from fedlora.models import masked_mean
from fedlora.privacy import calibrate_noise_multiplier


def embed(model, data, pad_id: int) -> dict[str, np.ndarray]:
    """Both features from one forward pass of the encoder: the CLS pooler's output and the masked mean
    (`models.masked_mean`, what `MaskedMeanPooler` returns)."""
    out = {"cls": [], "mean": []}
    with torch.inference_mode():
        for s in range(0, len(data), 256):
            batch = collate(data, np.arange(s, min(s + 256, len(data))), pad_id)
            batch.pop("labels")
            enc = model.bert(**batch)
            out["cls"].append(enc.pooler_output.numpy())
            out["mean"].append(masked_mean(enc.last_hidden_state, batch["attention_mask"]).numpy())
    return {k: np.concatenate(v).astype(np.float64) for k, v in out.items()}


def ridge_probe(X: np.ndarray, y: np.ndarray, Xt: np.ndarray, yt: np.ndarray, lam: float = 1e-3) -> float:
    mu = X.mean(0)
    Xc = X - mu
    w = np.linalg.solve(Xc.T @ Xc + lam * len(X) * np.eye(X.shape[1]), Xc.T @ (2.0 * y - 1.0))
    return float(((((Xt - mu) @ w) > 0).astype(int) == yt).mean())


def dp_head(clients, Xt, yt, W0, b0, cfg, seed: int) -> float:
    """FedAvg of heads trained by DP-SGD (Poisson batches, per-example clip, Gaussian noise, SGD + momentum)."""
    p, rounds = cfg.privacy, cfg.federation.rounds
    rng = np.random.default_rng(seed)
    W, b = W0.copy(), b0.copy()
    sizes = [len(y) for _, y in clients]
    sigmas = [calibrate_noise_multiplier(p.epsilon, p.delta, p.batch_size / n, rounds * p.local_steps, p.accountant)
              for n in sizes]
    lr, mom = p.optim.head_lr or p.optim.lr, p.optim.momentum
    for _ in range(rounds):
        heads = []
        for (X, y), n, sigma in zip(clients, sizes, sigmas):
            w, c, vw, vc = W.copy(), b.copy(), np.zeros_like(W), np.zeros_like(b)
            for _ in range(p.local_steps):
                idx = np.flatnonzero(rng.random(n) < p.batch_size / n)
                x, t = X[idx], y[idx]
                z = x @ w.T + c
                g = np.exp(z - z.max(1, keepdims=True))
                g /= g.sum(1, keepdims=True)
                g[np.arange(len(t)), t] -= 1.0
                norms = np.linalg.norm(g, axis=1) * np.sqrt((x**2).sum(1) + 1.0)  # per-example |grad W, grad b|
                g *= np.minimum(1.0, p.clip / np.maximum(norms, 1e-12))[:, None]
                gw = (g.T @ x + rng.normal(0, sigma * p.clip, w.shape)) / p.batch_size
                gc = (g.sum(0) + rng.normal(0, sigma * p.clip, c.shape)) / p.batch_size
                vw, vc = mom * vw + gw, mom * vc + gc
                w, c = w - lr * vw, c - lr * vc
            heads.append((w, c))
        share = np.asarray(sizes) / sum(sizes)
        W = sum(s * h[0] for s, h in zip(share, heads))
        b = sum(s * h[1] for s, h in zip(share, heads))
    return float(((Xt @ W.T + b).argmax(1) == yt).mean())


def gradient_split(cfg, data, pooling: str, n: int = 32) -> tuple[float, float]:
    """Median per-example L2 gradient norm of (head, LoRA B) for the FFA-LoRA model at initialisation."""
    host = ModelHost(cfg.model_copy(update={"model": cfg.model.model_copy(update={"pooling": pooling})}),
                     len(data.label_names), {cfg.lora.rank})
    host.activate(cfg.lora.rank, train_A=False)
    head, lora_b = [], []
    for i in range(n):
        host.model.zero_grad()
        host.model(**collate(data.clients[0], np.array([i]), host.tokenizer.pad_token_id)).loss.backward()
        grads = [(name, p.grad) for name, p in host.model.named_parameters() if p.requires_grad]
        head.append(sum(float(g.pow(2).sum()) for name, g in grads if ".modules_to_save." in name) ** 0.5)
        lora_b.append(sum(float(g.pow(2).sum()) for name, g in grads if ".lora_B." in name) ** 0.5)
    return statistics.median(head), statistics.median(lora_b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    cfg = load_config(None, ["privacy.mode=sample", "privacy.epsilon=3"])
    tok = load_tokenizer(cfg.model.name)
    data = prepare_data(cfg, tok)
    yt = data.test.labels
    print(f"held-out {len(yt)} sentences, majority class {max(yt.mean(), 1 - yt.mean()):.3f}; clients "
          f"{[len(c) for c in data.clients]}; DP: epsilon {cfg.privacy.epsilon:g}, {cfg.federation.rounds} rounds x "
          f"{cfg.privacy.local_steps} steps of {cfg.privacy.batch_size}, head lr {cfg.privacy.optim.head_lr:g}")
    print(f"{'pooling':<8} {'feature std':>11} {'mean/row norm':>13} {'ridge probe':>11} {'DP head eps=3 (median)':>24} "
          f"{'grad norm head / LoRA B':>24}")
    model = load_base_model(cfg.model.name, len(data.label_names), cfg.seed, "cls")
    W0 = model.classifier.weight.detach().double().numpy()  # the same head init for both poolings (same seed)
    b0 = model.classifier.bias.detach().double().numpy()
    feats = [embed(model, c, tok.pad_token_id) for c in data.clients]
    test = embed(model, data.test, tok.pad_token_id)
    for pooling in ("cls", "mean"):
        clients = [(f[pooling], c.labels) for f, c in zip(feats, data.clients)]
        X, y = np.concatenate([x for x, _ in clients]), np.concatenate([t for _, t in clients])
        ratio = np.linalg.norm(X.mean(0)) / np.linalg.norm(X, axis=1).mean()
        dp = [dp_head(clients, test[pooling], yt, W0, b0, cfg, s) for s in range(args.seeds)]
        head, lora_b = gradient_split(cfg, data, pooling)
        print(f"{pooling:<8} {X.std(0).mean():>11.3f} {ratio:>13.2f} {ridge_probe(X, y, test[pooling], yt):>11.3f} "
              f"{statistics.median(dp):>15.3f} ({min(dp):.3f}-{max(dp):.3f}) {f'{head:.3f} / {lora_b:.4f}':>24}")


if __name__ == "__main__":
    main()
