"""Markdown tables and the mean ± std formatting every suite's report uses."""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1; 0 for a single value, so one-seed quick runs stay finite)."""
    v = np.asarray([float(x) for x in values], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def fmt_mean_std(values: Iterable[float], digits: int = 3, scale: float = 1.0) -> str:
    m, s = mean_std(values)
    if math.isnan(m):
        return "–"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def fmt_bytes(n: float) -> str:
    for unit, size in (("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right_from: int = 1) -> str:
    """A GitHub markdown table; columns from `right_from` on are right-aligned (numbers)."""
    align = ["---" if i < right_from else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def epsilon_label(eps: float | None) -> str:
    return "∞ (no DP)" if eps is None else f"{eps:g}"


def epsilon_key(eps: float | None) -> str:
    """results.json key of a privacy level: "none" for no DP (JSON has no infinity)."""
    return "none" if eps is None else f"{eps:g}"
