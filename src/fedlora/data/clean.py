"""Turn raw (text, label) rows from any source into a TextDataset and a LoadReport.

Every loader hands its rows here so that dropping, deduplication and label mapping behave the same for
the embedded datasets, local files and Hugging Face datasets.
"""

from __future__ import annotations


import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .types import LoadReport, TextDataset
from fedlora.errors import UserError

_INT_RE = re.compile(r"^[+-]?\d+$")


@dataclass
class RawRows:
    """Rows as read from a source, before any cleaning.

    With ``label_names`` set, ``labels`` already hold ids into it (``None`` or a negative id = missing,
    as in Hugging Face ``ClassLabel`` columns that use -1 for unlabelled rows); otherwise labels are raw
    values mapped to ids here.
    """

    source: str
    texts: list[Any] = field(default_factory=list)
    labels: list[Any] = field(default_factory=list)
    bad_rows: int = 0
    label_names: list[str] | None = None


def decode_bytes(data: bytes) -> str:
    """Decode file bytes: UTF-8 (with or without BOM) first, then Windows-1252, then Latin-1 (never fails)."""
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    return data.decode("latin-1")


def normalise_text(value: Any) -> str | None:
    """Stripped text, or None when missing or empty. Numbers are accepted as text; containers are not."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        value = str(value)
    elif isinstance(value, (int, np.integer)):
        value = str(value)
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value or None


def normalise_label(value: Any) -> str | None:
    """The label's string form, or None when missing.

    Integral floats become ints (``1.0`` -> ``"1"``: pandas reads an int column with gaps as float) and
    JSON booleans become ``"true"``/``"false"``.
    """
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return None
        return str(int(value)) if float(value).is_integer() else str(float(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, str):
        return value.strip() or None
    return None


def label_order(names: set[str]) -> list[str]:
    """Label names in id order: numeric order when every name is an integer, else sorted strings.

    Numeric order keeps a file's integer labels 0..9, 10, 11 as ids 0..11 (plain string order would put
    "10" before "2" and silently renumber the classes).
    """
    if names and all(_INT_RE.match(n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


def build_dataset(raw: RawRows, *, dedup: bool = True) -> tuple[TextDataset, LoadReport]:
    """Drop empty-text and unlabelled rows, drop exact (text, label) duplicates when ``dedup``, map labels."""
    report = LoadReport(source=raw.source, bad_rows=raw.bad_rows)
    report.rows_read = len(raw.texts) + raw.bad_rows

    texts: list[str] = []
    keys: list[Any] = []
    for text_value, label_value in zip(raw.texts, raw.labels):
        text = normalise_text(text_value)
        if text is None:
            report.dropped_empty_text += 1
            continue
        key = _label_key(label_value, raw.label_names)
        if key is None:
            report.dropped_missing_label += 1
            continue
        texts.append(text)
        keys.append(key)

    texts, keys = _deduplicate(texts, keys, report, dedup)

    if raw.label_names is not None:
        names = list(raw.label_names)
        ids = np.asarray(keys, dtype=np.int64)
    else:
        names = label_order(set(keys))
        index = {name: i for i, name in enumerate(names)}
        ids = np.asarray([index[k] for k in keys], dtype=np.int64)

    ds = TextDataset(texts, ids, names)
    report.rows_kept = len(ds)
    report.label_counts = ds.label_counts()
    present = int(np.count_nonzero(np.bincount(ds.labels, minlength=ds.num_labels)))
    if present < 2:
        raise UserError(
            f"{raw.source}: {present} class(es) left after cleaning ({report.rows_kept} rows); "
            "classification needs at least 2"
        )
    return ds, report


def _label_key(value: Any, fixed_names: Sequence[str] | None) -> Any:
    """Id (fixed names) or normalised string (free labels); None when the label is missing."""
    if fixed_names is None:
        return normalise_label(value)
    if value is None or isinstance(value, bool):
        return None
    try:
        label_id = int(value)
    except (TypeError, ValueError):
        return None
    return label_id if 0 <= label_id < len(fixed_names) else None


def _deduplicate(texts: list[str], keys: list[Any], report: LoadReport, dedup: bool) -> tuple[list[str], list[Any]]:
    """Exact (text, label) repeats are dropped: a copy in train and test would leak the answer.

    The same text under a different label is kept and counted as a conflicting duplicate.
    """
    seen: dict[str, set[Any]] = {}
    out_texts: list[str] = []
    out_keys: list[Any] = []
    for text, key in zip(texts, keys):
        labels_seen = seen.setdefault(text, set())
        if key in labels_seen:
            report.duplicates += 1
            if dedup:
                report.dropped_duplicates += 1
                continue
        elif labels_seen:
            report.conflicting_duplicates += 1
        labels_seen.add(key)
        out_texts.append(text)
        out_keys.append(key)
    return out_texts, out_keys
