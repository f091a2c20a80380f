"""metrics.jsonl (one JSON object per round) and summary.json of a run folder.

The metrics writer is where every engine's rows go: it appends the row, keeps the round's global adapter
(output.keep_rounds) and sends the row to the configured experiment trackers (output.report_to).
"""

from __future__ import annotations


import json
import math
import weakref
from pathlib import Path

from fedlora import adapter_digest, tracking
from fedlora.errors import UserError


def _clean(value):
    """JSON has no NaN/Inf: write them as null so every line parses everywhere."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class MetricsWriter:
    """Appends rows to RUN_DIR/metrics.jsonl. With the run's `cfg`, also sends them to its trackers; with its
    `server` too, keeps each round's global adapter when output.keep_rounds is set."""

    def __init__(self, run_dir: Path, truncate_after_round: int | None = None, cfg=None, server=None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        if truncate_after_round is not None and self.path.exists():
            # On resume, rounds after the checkpoint were never committed: drop them so each round is once.
            kept = [r for r in read_metrics(self.path.parent) if r.get("round", 0) <= truncate_after_round]
            self.path.write_text("".join(json.dumps(_clean(r)) + "\n" for r in kept))
        self.server = server if cfg is not None and cfg.output.keep_rounds else None
        self.last_round = cfg.federation.rounds if cfg is not None else None
        self.private = cfg is not None and cfg.privacy.mode != "none"
        self.per_client = cfg is not None and cfg.output.report_per_client
        self.trackers = tracking.TrackerSet(cfg.output.report_to if cfg is not None else (), self.run_dir,
                                            tracking.flat_params(cfg.model_dump()) if cfg is not None else {},
                                            first_round=(truncate_after_round or 0) + 1)
        # A run that stops early (an error, a kill) still closes its trackers when the process ends.
        self._finalizer = weakref.finalize(self, self.trackers.close)

    def write(self, record: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(_clean(record)) + "\n")
            fh.flush()
        if self.server is not None:
            tensors = adapter_digest.server_state(self.server)
            if adapter_digest.digest(tensors) != record.get("global_adapter_sha256"):
                raise RuntimeError(f"round {record.get('round')}: the server's global state changed between the "
                                   "metrics row and the kept round file")
            adapter_digest.keep_round(self.run_dir, record["round"], tensors)
        if "round" in record:
            self.trackers.log(int(record["round"]),
                              tracking.publishable(_clean(record), private=self.private, per_client=self.per_client))
            if self.last_round is not None and record["round"] >= self.last_round:
                self.close()

    def close(self) -> None:
        self._finalizer()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # a kill in the middle of the last write: that round was never checkpointed
            raise UserError(f"{path}: line {i + 1} is not valid JSON") from None
    return rows


def write_summary(run_dir: Path, summary: dict) -> None:
    (Path(run_dir) / "summary.json").write_text(json.dumps(_clean(summary), indent=2) + "\n")
