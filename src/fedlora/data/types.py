"""Plain containers for a labelled text dataset and the report of how it was loaded."""

from __future__ import annotations


from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from fedlora.errors import UserError


@dataclass
class TextDataset:
    """Texts with integer labels ``0..num_labels-1`` and the name of each label id."""

    texts: list[str]
    labels: np.ndarray
    label_names: list[str]

    def __post_init__(self) -> None:
        self.texts = list(self.texts)
        self.label_names = [str(n) for n in self.label_names]
        labels = np.asarray(self.labels)
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise UserError(f"labels must be integers, got dtype {labels.dtype}")
        self.labels = labels.astype(np.int64).reshape(-1)
        if len(self.labels) != len(self.texts):
            raise UserError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        if self.labels.size and (self.labels.min() < 0 or self.labels.max() >= len(self.label_names)):
            raise UserError(f"label ids must lie in 0..{len(self.label_names) - 1}")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def subset(self, idx: Any) -> TextDataset:
        """Rows at the given integer indices (or boolean mask), in that order; label names are kept."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64).reshape(-1)
        return TextDataset([self.texts[i] for i in idx], self.labels[idx], list(self.label_names))

    def label_counts(self) -> dict[str, int]:
        """Rows per label name (every label name present, zero counts included)."""
        counts = np.bincount(self.labels, minlength=self.num_labels)
        return {name: int(c) for name, c in zip(self.label_names, counts)}


@dataclass
class LoadReport:
    """What happened to the rows of a source while loading it.

    ``rows_read`` counts every row of the source (bad JSON lines included), so
    ``rows_read == rows_kept + dropped_empty_text + dropped_missing_label + bad_rows + dropped_duplicates``.
    ``duplicates`` counts exact (text, label) repeats found; they are dropped (``dropped_duplicates``)
    unless the loader was called with ``dedup=False``.
    ``conflicting_duplicates`` counts rows whose text was already seen with another label: they are kept
    (they carry real label noise that a user may want to see) and only reported.
    """

    source: str
    rows_read: int = 0
    rows_kept: int = 0
    dropped_empty_text: int = 0
    dropped_missing_label: int = 0
    bad_rows: int = 0
    duplicates: int = 0
    dropped_duplicates: int = 0
    conflicting_duplicates: int = 0
    label_counts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for logs, e.g. ``rotten_tomatoes: kept 12752/12808 rows (dropped 56 duplicates) ...``."""
        dropped = [
            (self.dropped_empty_text, "empty text"),
            (self.dropped_missing_label, "missing label"),
            (self.bad_rows, "bad rows"),
            (self.dropped_duplicates, "duplicates"),
        ]
        parts = [f"{n} {what}" for n, what in dropped if n]
        line = f"{self.source}: kept {self.rows_kept}/{self.rows_read} rows"
        if parts:
            line += f" (dropped {', '.join(parts)})"
        if self.duplicates > self.dropped_duplicates:
            line += f"; {self.duplicates - self.dropped_duplicates} exact duplicates kept"
        if self.conflicting_duplicates:
            line += f"; {self.conflicting_duplicates} texts repeat with another label (kept)"
        labels = ", ".join(f"{name}={count}" for name, count in self.label_counts.items())
        return f"{line}; {len(self.label_counts)} labels: {labels}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
