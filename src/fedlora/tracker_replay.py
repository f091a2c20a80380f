"""`fedlora export-metrics RUN_DIR --to ...`: a finished (or stopped) run's metrics.jsonl replayed into trackers."""

from __future__ import annotations

from pathlib import Path

from fedlora import tracking
from fedlora.config import load_config
from fedlora.errors import UserError
from fedlora.metrics import read_metrics


def export_metrics(run_dir: str | Path, to: list[str], per_client: bool | None = None) -> int:
    """Replay a run's metrics.jsonl into trackers (new tracker runs, as the run would have logged them); returns
    the number of rows sent. `per_client`: None = the run's output.report_per_client."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "config.toml").is_file():
        raise UserError(f"not a run folder (needs metrics.jsonl and config.toml): {run_dir}")
    cfg = load_config(run_dir / "config.toml")
    private = cfg.privacy.mode != "none"
    per_client = cfg.output.report_per_client if per_client is None else per_client
    rows = read_metrics(run_dir)
    trackers = tracking.TrackerSet(to, run_dir, tracking.flat_params(cfg.model_dump()), resume_state=False)
    try:
        for row in rows:
            trackers.log(int(row["round"]), tracking.publishable(row, private=private, per_client=per_client))
    finally:
        trackers.close()
    return len(rows)
