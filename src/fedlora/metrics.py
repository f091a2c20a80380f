"""metrics.jsonl (one JSON object per round) and summary.json of a run folder."""

from __future__ import annotations


import json
import math
from pathlib import Path
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
    def __init__(self, run_dir: Path, truncate_after_round: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        if truncate_after_round is not None and self.path.exists():
            # On resume, rounds after the checkpoint were never committed: drop them so each round is once.
            kept = [r for r in read_metrics(self.path.parent) if r.get("round", 0) <= truncate_after_round]
            self.path.write_text("".join(json.dumps(_clean(r)) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(_clean(record)) + "\n")
            fh.flush()


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
