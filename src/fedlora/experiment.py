"""What every engine shares around the round loop: data preparation, the run folder, adapter export."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from fedlora import lora
from fedlora.client import EncodedData, encode
from fedlora.config import ExperimentConfig
from fedlora.strategies import LoraFactors


@dataclass
class FederatedData:
    clients: list[EncodedData]
    test: EncodedData
    label_names: list[str]
    partition_stats: list[dict]
    load_summary: str


def prepare_data(cfg: ExperimentConfig, tokenizer) -> FederatedData:
    """Load, split (fixed stratified held-out test set no client trains on), partition and tokenize."""
    from fedlora.data import load_text_dataset, partition_indices, partition_stats, stratified_split

    d = cfg.data
    ds, report = load_text_dataset(d.name, path=d.path, text_column=d.text_column, label_column=d.label_column)
    train, test = stratified_split(ds, d.test_fraction, seed=cfg.seed)
    if d.max_eval_examples is not None and len(test) > d.max_eval_examples:
        keep = np.random.default_rng(cfg.seed).choice(len(test), d.max_eval_examples, replace=False)
        test = test.subset(np.sort(keep))
    fed = cfg.federation
    parts = partition_indices(
        train.labels, fed.num_clients, fed.partition, alpha=fed.alpha, seed=cfg.seed,
        label_fractions=fed.label_fractions,
    )
    train_enc = encode(tokenizer, train.texts, train.labels, d.max_length)
    return FederatedData(
        clients=[train_enc.subset(p) for p in parts],
        test=encode(tokenizer, test.texts, test.labels, d.max_length),
        label_names=list(ds.label_names),
        partition_stats=partition_stats(train.labels, parts),
        load_summary=report.summary(),
    )


def make_run_dir(cfg: ExperimentConfig, out: str | None) -> Path:
    if out:
        path = Path(out)
    else:
        name = cfg.output.name or f"{cfg.strategy.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        path = Path(cfg.output.dir) / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.toml").write_text(cfg.to_toml())
    return path


def dense_to_factors(delta: np.ndarray, tol: float = 1e-7) -> tuple[np.ndarray, np.ndarray]:
    """Exact low-rank factors (B = U·Σ, A = Vᵀ) of a dense delta, dropping singular values below tol·σ_max."""
    u, s, vt = np.linalg.svd(delta.astype(np.float64), full_matrices=False)
    keep = max(1, int(np.sum(s > tol * max(s[0], 1e-30))))
    return (u[:, :keep] * s[:keep]), vt[:keep]


def export_adapter(
    cfg: ExperimentConfig,
    path: Path,
    rank: int,
    factors: dict[str, LoraFactors],
    head: dict[str, np.ndarray],
    base_delta: dict[str, np.ndarray],
    label_names: list[str],
) -> None:
    """Write the global model as a PEFT adapter that `PeftModel.from_pretrained(base, path)` loads.

    Deltas merged into the base weights (FLoRA, FedEx) are folded into the adapter by an exact SVD, so the
    exported adapter alone reproduces the global model on the untouched base.
    """
    from peft import get_peft_model

    from fedlora.models import load_base_model, lora_config

    if base_delta:
        total = {n: base_delta.get(n, 0) + f.delta() for n, f in factors.items()}
        low = {n: dense_to_factors(d) for n, d in total.items()}
        rank = max(b.shape[1] for b, _ in low.values())
        # One rank for all modules: pad the smaller ones with zero slots (they add nothing).
        factors = {
            n: LoraFactors(A=np.pad(a, ((0, rank - a.shape[0]), (0, 0))), B=np.pad(b, ((0, 0), (0, rank - b.shape[1]))), scale=1.0)
            for n, (b, a) in low.items()
        }
        lcfg = cfg.model_copy(deep=True)
        lcfg.lora.alpha, lcfg.lora.rslora = float(rank), False  # scale 1: B carries Σ
    else:
        lcfg = cfg
    base = load_base_model(cfg.model.name, len(label_names), cfg.seed)
    model = get_peft_model(base, lora_config(lcfg, rank))
    lora.set_factors(model, "default", lora.with_scale(factors, lcfg.lora.scale(rank)))
    if head:
        lora.set_head(model, "default", head)
    model.save_pretrained(str(path))
    (path / "fedlora.json").write_text(
        json.dumps({"model": cfg.model.name, "num_labels": len(label_names), "label_names": label_names,
                    "rank": rank, "strategy": cfg.strategy.name}, indent=2)
    )
