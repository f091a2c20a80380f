"""The suites' figures (matplotlib, Agg, PNG): mean curves with a std band, error bars, log-log timings."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _panels(n: int, width: float = 4.2, height: float = 3.4):
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), dpi=120, squeeze=False)
    return fig, axes[0]


def plot_curves_with_band(
    panels: Mapping[str, Mapping[str, np.ndarray]], path: Path, xlabel: str = "round", ylabel: str = "accuracy",
) -> Path:
    """One subplot per panel; in each, one line per method: mean over seeds (rows) with a ±std band."""
    fig, axes = _panels(len(panels))
    for ax, (title, methods) in zip(axes, panels.items()):
        for method, curves in methods.items():
            curves = np.atleast_2d(np.asarray(curves, dtype=np.float64))
            xs = np.arange(curves.shape[1])
            mean, std = curves.mean(0), curves.std(0, ddof=1) if curves.shape[0] > 1 else np.zeros(curves.shape[1])
            (line,) = ax.plot(xs, mean, marker="o", ms=3, label=f"{method} (n={curves.shape[0]})")
            ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_errorbars(
    categories: Sequence[str], series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: Path,
    xlabel: str, ylabel: str, title: str,
) -> Path:
    """Categorical x (e.g. epsilon 1, 3, 6, no DP); one line per method with mean ± std error bars."""
    fig, axes = _panels(1, width=5.6, height=3.8)
    ax = axes[0]
    xs = np.arange(len(categories))
    for i, (name, (mean, std)) in enumerate(series.items()):
        ax.errorbar(xs + 0.04 * (i - (len(series) - 1) / 2), mean, yerr=std, marker="o", capsize=3, label=name)
    ax.set_xticks(xs, categories)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_loglog(
    panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]], path: Path, ylabel: str,
) -> Path:
    """One subplot per panel, title 'x-axis name ...'; each method a line of (x, y) on log-log axes."""
    fig, axes = _panels(len(panels), width=5.0, height=3.8)
    for ax, (title, methods) in zip(axes, panels.items()):
        ticks: set[float] = set()
        for method, (xs, ys) in methods.items():
            ax.loglog(xs, ys, marker="o", ms=3, label=method)
            ticks.update(xs)
        ax.set_xticks(sorted(ticks), [f"{x:g}" for x in sorted(ticks)])  # the measured points, not 2x10^0
        ax.minorticks_off()
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(title.split(" ")[0])
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_slot_norms(panels: Mapping[str, Mapping[str, np.ndarray]], path: Path, rank_marks: Mapping[str, Sequence[int]]) -> Path:
    """Per rank slot j, the global update's ‖s·B[:, j]‖·‖A[j, :]‖ summed over modules; mean over seeds, log y.

    Vertical lines mark the client ranks: slots right of a mark are trained by fewer clients.
    """
    fig, axes = _panels(len(panels))
    for ax, (title, methods) in zip(axes, panels.items()):
        for method, norms in methods.items():
            norms = np.atleast_2d(np.asarray(norms, dtype=np.float64))
            xs = np.arange(1, norms.shape[1] + 1)
            ax.plot(xs, np.maximum(norms.mean(0), 1e-12), marker="o", ms=3, label=method)
        for r in rank_marks.get(title, ()):
            ax.axvline(r + 0.5, color="grey", lw=0.6, ls=":")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("rank slot j (1-based)")
        ax.set_ylabel("Σ_modules s·‖B[:, j]‖·‖A[j, :]‖")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)
