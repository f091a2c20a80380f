"""Plots (matplotlib PNG) and report.md for one or several run folders."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from fedlora.metrics import read_metrics  # noqa: E402


def _label(run_dir: Path) -> str:
    summary = run_dir / "summary.json"
    if summary.exists():
        return f"{json.loads(summary.read_text()).get('strategy', run_dir.name)} ({run_dir.name})"
    return run_dir.name


def plot_accuracy(run_dirs: list[Path], out_png: Path, title: str = "held-out accuracy per round") -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for run_dir in run_dirs:
        rows = read_metrics(run_dir)
        before = None
        summary = run_dir / "summary.json"
        if summary.exists():
            before = json.loads(summary.read_text()).get("accuracy_before")
        xs = ([0] if before is not None else []) + [r["round"] for r in rows]
        ys = ([before] if before is not None else []) + [r["eval_accuracy"] for r in rows]
        ax.plot(xs, ys, marker="o", label=_label(run_dir))
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def plot_run(run_dir: Path) -> list[Path]:
    return [plot_accuracy([run_dir], run_dir / "plots" / "accuracy.png")]


def compare_runs(run_dirs: list[Path], out_dir: Path) -> Path:
    """A report.md with one row per run and an overlaid accuracy plot."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_accuracy(run_dirs, out_dir / "plots" / "accuracy.png")
    lines = ["# fedlora report", "", "| run | strategy | rounds | accuracy before | final accuracy | MB up | MB down | final epsilon |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for run_dir in run_dirs:
        s = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
        eps = s.get("final_epsilon")
        lines.append(
            f"| {run_dir.name} | {s.get('strategy', '?')} | {s.get('rounds', '?')} | "
            f"{s.get('accuracy_before', float('nan')):.4f} | {s.get('final_accuracy', float('nan')):.4f} | "
            f"{s.get('bytes_up_total', 0) / 1e6:.2f} | {s.get('bytes_down_total', 0) / 1e6:.2f} | "
            f"{'-' if eps is None else f'{eps:.3f}'} |"
        )
    # How each run's accuracy was scored (summary.json's eval_protocol: scorer, shots, prompt template).
    scored = [(d.name, json.loads((d / "summary.json").read_text()).get("eval_protocol"))
              for d in run_dirs if (d / "summary.json").exists()]
    lines += [""] + [f"- {name}: scored by {p['scorer']}, {p['shots']} shots, template {p['template']}"
                     for name, p in scored if p]
    lines += ["", f"![accuracy per round]({png.relative_to(out_dir)})", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    return report
