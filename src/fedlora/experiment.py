"""What every engine shares around the round loop: data preparation, the run folder, adapter export."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np

from fedlora import adapter_digest, lora
from fedlora.encoding import EncodedData, FederatedData  # noqa: F401  (re-exported)
from fedlora.config import ExperimentConfig
from fedlora.strategies import LoraFactors


def prepare_data(cfg: ExperimentConfig, tokenizer) -> FederatedData:
    """The run's data as its task prepares it: a fixed held-out set, one tokenized partition per client."""
    from fedlora.tasks import get_task

    return get_task(cfg.task).prepare_data(cfg, tokenizer)


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

    `base` must be built as the run built it: `models.load_base_model(name, num_labels, seed, pooling)` with the
    pooling recorded in fedlora.json (`models.load_exported_model(path)` does exactly that).

    Deltas merged into the base weights (FLoRA, FedEx) are folded into the adapter by an exact SVD, so the
    exported adapter alone reproduces the global model on the untouched base.
    """
    from peft import get_peft_model

    from fedlora.host import adapter_options, lora_config, resolve_model_path
    from fedlora.tasks import get_task
    from fedlora.verify import base_identity, write_manifest

    global_sha = adapter_digest.digest(adapter_digest.global_tensors(factors, head, base_delta))
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
        lcfg.lora.alpha, lcfg.lora.scaling = float(rank), "alpha/r"  # scale 1: B carries Σ
    else:
        lcfg = cfg
    task = get_task(cfg.task)
    base = task.base_model(cfg, len(label_names))
    model = get_peft_model(base, lora_config(lcfg, rank, adapter_options(lcfg, base)))
    lora.set_factors(model, "default", lora.with_scale(factors, lcfg.lora.scale(rank)))
    if head:
        lora.set_head(model, "default", head)
    model.save_pretrained(str(path))
    (path / "fedlora.json").write_text(
        json.dumps({**task.export_meta(cfg, label_names), "rank": rank, "strategy": cfg.strategy.name}, indent=2)
    )
    # Last: the manifest hashes every file above (fedlora verify, load_exported_model check it).
    write_manifest(path, config_toml=cfg.to_toml(), global_sha256=global_sha,
                   base=base_identity(cfg.model.name, resolve_model_path(cfg.model.name)))


def metrics_row(
    cfg: ExperimentConfig,
    server,
    outcome,
    updates: list,
    sampled: list[int],
    dropped: dict[int, str],
    evaluation: tuple[float, float],
    wall_s: float,
    traffic: tuple[int, int, int] | None = None,
) -> dict:
    """One metrics.jsonl row, the same keys on every engine.

    `traffic` = (bytes_up, bytes_up_head, bytes_down) measured on the wire by an engine that has one (Flower);
    otherwise the server's count of the tensors sent is used.
    """
    bytes_up, bytes_up_head, bytes_down = traffic or (outcome.bytes_up, outcome.bytes_up_head, outcome.bytes_down)
    samples = sum(u.samples for u in updates)
    train_s = sum(u.train_s for u in updates)
    row = {
        "round": server.round,
        "strategy": server.strategy.name or cfg.strategy.name,
        "clients": outcome.trained,
        "sampled": sampled,
        "dropped": sorted(dropped),
        "dropped_reasons": {str(k): v for k, v in sorted(dropped.items())},
        "rejected": {str(k): v for k, v in outcome.rejected.items()},
        "ranks": {str(u.client_id): u.rank for u in updates},
        "train_loss": float(np.mean([u.train_loss for u in updates])) if updates else None,
        "eval_loss": evaluation[0],
        "eval_accuracy": evaluation[1],
        "bytes_up": bytes_up,
        "bytes_up_head": bytes_up_head,
        "bytes_down": bytes_down,
        "samples": samples,
        "train_s": train_s,
        "samples_per_s": samples / train_s if train_s > 0 else None,
        "wall_s": wall_s,
    }
    if "update_norms" in outcome.extra:  # each client's change (L2 of what it sent), as the server measured it
        row["update_norms"] = outcome.extra["update_norms"]
    row.update(adapter_digest.round_fields(server))  # the global model this round released: digest, norm
    row.update(server.mechanism.metrics(server.privacy))
    return row


def run_summary(cfg: ExperimentConfig, server, rows: list[dict], before: tuple[float, float], data: FederatedData,
                **extra) -> dict:
    """summary.json of a finished run, from its metrics rows (so a resumed run summarises every round)."""
    loss0, acc0 = before
    samples = sum(r.get("samples", 0) for r in rows)
    train_s = sum(r.get("train_s", 0.0) for r in rows)
    summary = {
        "strategy": server.strategy.name or cfg.strategy.name,
        "engine": cfg.engine,
        "rounds": server.round,
        "accuracy_before": acc0,
        "eval_loss_before": loss0,
        "final_accuracy": rows[-1]["eval_accuracy"] if rows else acc0,
        "final_eval_loss": rows[-1]["eval_loss"] if rows else loss0,
        "best_accuracy": max([r["eval_accuracy"] for r in rows] + [acc0]),
        "bytes_up_total": sum(r["bytes_up"] for r in rows),
        "bytes_down_total": sum(r["bytes_down"] for r in rows),
        "train_samples_per_s": samples / train_s if train_s > 0 else None,
        "wall_s": sum(r["wall_s"] for r in rows),
        "num_clients": cfg.federation.num_clients,
        "client_ranks": cfg.client_ranks(),
        "test_examples": len(data.test),
        # What always giving the most frequent held-out answer scores: the floor "learned" is read against.
        "majority_accuracy": majority_accuracy(data.test),
        "partition": data.partition_stats,
        **({"partition_groups": data.partition_groups} if data.partition_groups else {}),
        "dropped_total": sum(len(r.get("dropped", [])) for r in rows),
        **extra,
    }
    if rows and "personal_accuracy" in rows[-1]:  # FedSA: the clients' own models, scored on their side
        summary["personal_accuracy"] = rows[-1]["personal_accuracy"]
    if rows and cfg.privacy.mode != "none":
        summary["final_epsilon"] = rows[-1].get("epsilon")
        summary["delta"] = cfg.privacy.delta
    return summary


def majority_accuracy(test: EncodedData) -> float:
    """The share of the most frequent reference: the label for a classifier, the answer text for a causal LM
    (free-form answers all share one partition class, which would make this 1.0)."""
    if len(test) == 0:
        return 0.0
    if test.answers is not None:
        _, counts = np.unique(np.asarray([" ".join(a.split()).lower() for a in test.answers], dtype=object),
                              return_counts=True)
        return float(counts.max() / len(test))
    return float(np.bincount(test.labels).max() / len(test))


def load_global(cfg: ExperimentConfig, host, server) -> str:
    """Put the server's global model into the host's adapter of its rank; return the adapter's name."""
    rank, factors = server.global_eval_factors()
    adapter = host.ensure_rank(rank)
    lora.set_factors(host.model, adapter, lora.with_scale(factors, cfg.lora.scale(rank)))
    if server.head:
        lora.set_head(host.model, adapter, server.head)
    return adapter


def evaluate_global(cfg: ExperimentConfig, host, server, test: EncodedData) -> tuple[float, float]:
    """(loss, accuracy) of the server's global model on the held-out set, on the adapter of its rank."""
    from fedlora.client import evaluate

    return evaluate(host, load_global(cfg, host, server), test, cfg.eval.batch_size)
