"""In-process engine: the base model is loaded once, clients are simulated by swapping adapters.

Deterministic for a seed: client sampling, batches, seeded A, DP noise all derive from `cfg.seed`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from fedlora import lora
from fedlora.client import ClientTrainer, Update
from fedlora.config import ExperimentConfig
from fedlora.experiment import FederatedData, evaluate_global, export_adapter, metrics_row, prepare_data, run_summary
from fedlora.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from fedlora.metrics import MetricsWriter, read_metrics, write_summary
from fedlora.models import ModelHost, adapter_name, load_tokenizer
from fedlora.progress import RunProgress
from fedlora.dp import SamplePrivacy
from fedlora.server import RoundFailed, Server
from fedlora.strategies import get_strategy


def build_strategy(cfg: ExperimentConfig, dims: dict[str, tuple[int, int]]):
    """The configured method, told the scale law and the seeded global init every client derives."""
    r_max = max(cfg.client_ranks())
    options = dict(cfg.strategy.options)
    options.setdefault("scale_for_rank", cfg.lora.scale)
    options.setdefault("seed", cfg.seed)
    options.setdefault("initial_factors", lora.initial_factors(cfg.seed, dims, r_max, cfg.lora.scale(r_max)))
    return get_strategy(cfg.strategy.name, **options)


class LocalRun:
    """One experiment in this process. `run()` executes every remaining round and writes the run folder."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, progress: RunProgress):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.progress = progress
        torch.manual_seed(cfg.seed)
        tokenizer = load_tokenizer(cfg.model.name)
        self.data: FederatedData = prepare_data(cfg, tokenizer)
        progress.note(self.data.load_summary)
        self.host = ModelHost(cfg, len(self.data.label_names), set(cfg.client_ranks()))
        self.strategy = build_strategy(cfg, lora.module_dims(self.host.model))
        self.trainer = ClientTrainer(cfg, self.host, self.strategy)
        self.before: tuple[float, float] | None = None  # (loss, accuracy) of the global model before round 1
        r_max = max(cfg.client_ranks())
        self.client_privacy: dict[int, SamplePrivacy] = {}
        if cfg.privacy.mode == "sample":
            self.client_privacy = {c: SamplePrivacy.for_client(cfg, len(d)) for c, d in enumerate(self.data.clients)}
        self.server = Server(
            cfg, self.strategy, lora.module_dims(self.host.model),
            lora.get_head(self.host.model, adapter_name(r_max)), [len(c) for c in self.data.clients],
        )

    @classmethod
    def resume(cls, cfg: ExperimentConfig, run_dir: Path, progress: RunProgress) -> "LocalRun":
        """Rebuild the run from its config, then restore the last checkpoint."""
        state = load_checkpoint(Path(run_dir) / "checkpoint")  # first: a damaged file fails before the model loads
        run = cls(cfg, run_dir, progress)
        run.server.load_state_dict(state["server"])
        run.client_privacy = {int(c): SamplePrivacy.from_state_dict(d) for c, d in state["client_privacy"].items()}
        with torch.no_grad():
            layers = lora.lora_layers(run.host.model)
            for name, w in state["base_weights"].items():
                layers[name].get_base_layer().weight.copy_(torch.from_numpy(w))
        run.before = tuple(state["before"])
        progress.note(f"resumed {run_dir} after round {run.server.round}")
        return run

    def save_checkpoint(self) -> None:
        layers = lora.lora_layers(self.host.model)
        save_checkpoint(self.run_dir / "checkpoint", {
            "server": self.server.state_dict(),
            "client_privacy": {c: p.state_dict() for c, p in self.client_privacy.items()},
            # The exact float32 base weights that absorbed merges (FLoRA, FedEx), not a re-summed delta.
            "base_weights": {n: layers[n].get_base_layer().weight.detach().numpy().copy() for n in self.server.base_delta},
            "before": list(self.before),
        })

    def evaluate_global(self) -> tuple[float, float]:
        return evaluate_global(self.cfg, self.host, self.server, self.data.test)

    def train_round(self) -> tuple[list[Update], list[int], dict[int, str]]:
        server = self.server
        sampled = server.sample_clients()
        dropped = server.draw_dropouts(sampled)
        updates, skipped = [], {c: "dropped out (simulated failure)" for c in dropped}
        active = [c for c in sampled if c not in dropped]
        self.progress.start_round(server.round + 1, len(active) * self.cfg.local_steps())
        for c in active:
            dp = self.client_privacy.get(c)
            if dp is not None and not dp.can_train(self.cfg.local_steps()):
                skipped[c] = "privacy budget exhausted"
                self.progress.note(f"client {c} sits out: its next round would exceed epsilon={dp.target_epsilon}")
                continue
            update = self.trainer.train(c, server.downlink(c), self.data.clients[c], dp=dp)
            updates.append(update)
            self.progress.advance(update.steps)
        return updates, sampled, skipped

    def run(self) -> dict:
        cfg, server = self.cfg, self.server
        writer = MetricsWriter(self.run_dir, truncate_after_round=server.round)
        if self.before is None:
            # A fresh run in a folder that held another run: a kill before round 1 ends must not leave that
            # run's checkpoint for `fedlora resume` to mix into this one.
            (self.run_dir / "checkpoint" / CHECKPOINT_FILE).unlink(missing_ok=True)
            self.before = self.evaluate_global()
            self.progress.note(f"held-out accuracy before training: {self.before[1]:.4f} ({len(self.data.test)} examples)")
        loss0, acc0 = self.before
        for _ in range(server.round, cfg.federation.rounds):
            t_round = time.perf_counter()
            updates, sampled, skipped = self.train_round()
            try:
                outcome = server.finish_round(updates, sampled, cfg.federation.max_update_norm)
            except RoundFailed as exc:  # name the clients that never sent anything too
                why = "; ".join(f"client {c}: {r}" for c, r in sorted(skipped.items()))
                raise RoundFailed(f"{exc}" + (f" (no update: {why})" if why else "")) from None
            if outcome.base_delta:
                lora.merge_base_delta(self.host.model, outcome.base_delta)
            eval_loss, eval_acc = self.evaluate_global()
            row = metrics_row(cfg, server, outcome, updates, sampled, skipped, (eval_loss, eval_acc),
                              time.perf_counter() - t_round)
            writer.write(row)
            self.save_checkpoint()
            self.progress.end_round(row)

        rows = read_metrics(self.run_dir)
        rank, factors = server.global_eval_factors()
        if cfg.output.save_adapter:
            export_adapter(cfg, self.run_dir / "adapter", rank, factors, server.head, server.base_delta,
                           self.data.label_names)
        summary = run_summary(cfg, server, rows, self.before, self.data)
        write_summary(self.run_dir, summary)
        return summary
