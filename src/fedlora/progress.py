"""Live progress on stderr (a bar per round) and the closing table, with rich."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


class RunProgress:
    """Progress bar per round (local steps of every client in it) and one line per finished round."""

    def __init__(self, enabled: bool = True, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self._progress: Progress | None = None
        self._task = None

    def note(self, text: str) -> None:
        if self.enabled and text:
            self.console.print(f"[dim]{text}[/dim]")

    def start_round(self, rnd: int, total_steps: int) -> None:
        if not self.enabled:
            return
        self._progress = Progress(
            TextColumn(f"round {rnd}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
            TimeElapsedColumn(), console=self.console, transient=True,
            disable=not self.console.is_terminal and not sys.stderr.isatty(),
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=max(total_steps, 1))

    def advance(self, steps: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, steps)

    def end_round(self, row: dict) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if not self.enabled:
            return
        eps = f"  eps {row['epsilon']:.3f}" if row.get("epsilon") is not None else ""
        extra = ""
        if row.get("dropped"):
            extra += f"  dropped {row['dropped']}"
        if row.get("rejected"):
            extra += f"  rejected {sorted(row['rejected'])}"
        sps = row.get("samples_per_s")
        self.console.print(
            f"round {row['round']:>3}  acc {row['eval_accuracy']:.4f}  loss {row['eval_loss']:.4f}  "
            f"train_loss {row['train_loss'] if row['train_loss'] is None else round(row['train_loss'], 4)}  "
            f"{sps or 0:.0f} samples/s  {row['wall_s']:.1f}s{eps}{extra}"
        )


def summary_table(summary: dict, rows: list[dict]) -> Table:
    table = Table(title=f"fedlora run — {summary['strategy']}", show_header=True)
    table.add_column("round", justify="right")
    table.add_column("accuracy", justify="right")
    table.add_column("eval loss", justify="right")
    table.add_column("bytes up", justify="right")
    table.add_column("bytes down", justify="right")
    table.add_column("wall s", justify="right")
    if any(r.get("epsilon") is not None for r in rows):
        table.add_column("epsilon", justify="right")
    table.add_row("0", f"{summary['accuracy_before']:.4f}", f"{summary['eval_loss_before']:.4f}", "-", "-", "-",
                  *(["-"] if len(table.columns) > 6 else []))
    for r in rows:
        cells = [str(r["round"]), f"{r['eval_accuracy']:.4f}", f"{r['eval_loss']:.4f}", f"{r['bytes_up']:,}",
                 f"{r['bytes_down']:,}", f"{r['wall_s']:.1f}"]
        if len(table.columns) > 6:
            cells.append("-" if r.get("epsilon") is None else f"{r['epsilon']:.3f}")
        table.add_row(*cells)
    sps = summary.get("train_samples_per_s")
    table.caption = (
        f"accuracy {summary['accuracy_before']:.4f} -> {summary['final_accuracy']:.4f}   "
        f"up {summary['bytes_up_total'] / 1e6:.2f} MB  down {summary['bytes_down_total'] / 1e6:.2f} MB   "
        f"train {sps or 0:.0f} samples/s   wall {summary['wall_s']:.1f} s"
    )
    return table
