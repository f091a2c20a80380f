"""Post-hoc diagnostics of a mixed-rank run's final global adapter (issue 18), read from its run folder.

- cut-off accuracy: the held-out accuracy of the global adapter with every slot above k removed
  (ΔW_k = s_g·B[:, :k]·A[:k], head unchanged), for each client rank k. A method whose high slots carry what only
  the high-rank clients learned shows it here: accuracy moves when those slots are added.
- prediction fractions: the share of held-out examples the (uncut) global model puts in each class; a model that
  collapses onto one class has the accuracy of that class's share.

The model is loaded once per call and the held-out set once per seed (it depends on the seed), so diagnosing many
runs costs little more than evaluating them. Results are cached in `<run>/diagnostics.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedlora.checkpoint import load_checkpoint
from fedlora.strategies import LoraFactors

CACHE = "diagnostics.json"


def final_global(run_dir: Path) -> tuple[dict[str, LoraFactors], dict[str, np.ndarray]] | None:
    """(widest downlink factors, head) of the last checkpoint; None when there is no global adapter (FLoRA)."""
    state = load_checkpoint(Path(run_dir) / "checkpoint")["server"]
    downlinks = state["downlinks"]
    if not downlinks:
        return None
    widest = downlinks[max(downlinks, key=int)]
    return ({m: LoraFactors(A=np.asarray(f.A, np.float64), B=np.asarray(f.B, np.float64), scale=float(f.scale))
             for m, f in widest.items()}, dict(state["head"]))


def _predict(host, adapter: str, data, batch_size: int = 64) -> np.ndarray:
    import torch

    from fedlora.client import collate
    from fedlora.devices import to_device

    host.model.set_adapter(adapter)
    pad = host.tokenizer.pad_token_id or 0
    out = np.zeros(len(data.labels), np.int64)
    with torch.inference_mode():
        for s in range(0, len(data.labels), batch_size):
            idx = np.arange(s, min(s + batch_size, len(data.labels)))
            batch = to_device(collate(data, idx, pad), host.device)
            out[idx] = host.model(**batch).logits.argmax(-1).cpu().numpy()
    return out


def diagnose(run_dirs: list[Path], console=None) -> dict[str, dict]:
    """run folder -> {"cutoff_accuracy": {k: acc}, "pred_fractions": [...], "label_fractions": [...],
    "accuracy": acc}; {} for a run without a global adapter."""
    from fedlora import lora
    from fedlora.config import load_config
    from fedlora.experiment import prepare_data
    from fedlora.host import ModelHost, load_tokenizer

    out, host, data_by_key = {}, None, {}
    for d in map(Path, run_dirs):
        cached = d / CACHE
        if cached.exists():
            out[str(d)] = json.loads(cached.read_text())
            continue
        glob = final_global(d)
        if glob is None:
            out[str(d)] = {}
            continue
        factors, head = glob
        cfg = load_config(d / "config.toml")
        ranks = sorted(set(cfg.client_ranks()))
        key = (cfg.seed, cfg.data.model_dump_json())
        if key not in data_by_key:
            fd = prepare_data(cfg, load_tokenizer(cfg.model.name))
            data_by_key[key] = (fd.test, len(fd.label_names))
        test, n_cls = data_by_key[key]
        if host is None or not set(ranks) <= host.ranks or host.cfg.model.name != cfg.model.name:
            host = ModelHost(cfg, n_cls, ranks)
        res = {"cutoff_accuracy": {}, "label_fractions": (np.bincount(test.labels, minlength=n_cls)
                                                           / len(test.labels)).tolist()}
        for k in ranks:
            cut = {m: LoraFactors(A=f.A[:k], B=f.B[:, :k], scale=f.scale) for m, f in factors.items()}
            adapter = host.ensure_rank(k)
            lora.set_factors(host.model, adapter, lora.with_scale(cut, cfg.lora.scale(k)))
            lora.set_head(host.model, adapter, head)
            pred = _predict(host, adapter, test)
            res["cutoff_accuracy"][str(k)] = float((pred == test.labels).mean())
            if k == ranks[-1]:
                res["pred_fractions"] = (np.bincount(pred, minlength=n_cls) / len(pred)).tolist()
                res["accuracy"] = res["cutoff_accuracy"][str(k)]
        cached.write_text(json.dumps(res))
        out[str(d)] = res
        if console is not None:
            console.print(f"[dim]diagnosed {d.name}: cut-off accuracy {res['cutoff_accuracy']}[/dim]")
    return out
