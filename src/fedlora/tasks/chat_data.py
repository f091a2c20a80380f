"""Instruction data in TRL's dataset formats for task=causal-lm: read, detect the format, check every record.

Formats (detected from the columns, or named by `data.format`):
- conversational: `messages`, a list of {role, content} (system, user, assistant), multi-turn;
- prompt-completion: `prompt` and `completion` (strings, or lists of messages as in TRL's conversational form);
- language modelling: `text`.
A `system` column (or a leading system message) is that record's system prompt; `data.system_prompt` is the
default. Every record becomes a list of messages (or a plain text); the bad ones are counted per reason, never
dropped silently. Written here rather than taken from TRL: TRL is not a dependency, and its SFT collators mask
assistant turns only for chat templates that carry `{% generation %}` markers (SmolLM2's does not).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fedlora.data import instruct_bench
from fedlora.errors import UserError

FORMATS = ("messages", "prompt-completion", "text")
ROLES = ("system", "user", "assistant")


@dataclass
class Records:
    """The usable records of a source: messages per record (None for `text` data), texts, partition keys."""

    fmt: str
    conversations: list[list[dict]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    rows_read: int = 0
    bad: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.texts) if self.fmt == "text" else len(self.conversations)

    def summary(self) -> str:
        dropped = ", ".join(f"{reason}={n}" for reason, n in sorted(self.bad.items())) or "none"
        return f"{self.fmt} records: {self.rows_read} read, {len(self)} kept; dropped: {dropped}"


def source_columns(name: str, path: str | None) -> set[str]:
    """The columns a file or Hugging Face dataset holds, read without loading every row where it can be."""
    if name == instruct_bench.NAME:
        return set(instruct_bench.COLUMNS)
    if name in ("csv", "jsonl", "parquet"):
        file = _file(path)
        suffix = file.suffix.lower()
        if suffix in (".jsonl", ".json"):
            return set().union(*_jsonl(file)[0]) if file.stat().st_size else set()
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return set(pq.read_schema(file).names)
        import csv

        with open(file, newline="", encoding="utf-8-sig", errors="replace") as f:
            header = next(csv.reader(f, delimiter="\t" if suffix == ".tsv" else ","), [])
        return {h.strip() for h in header}
    return set(_hub(name).column_names)


def read_rows(name: str, path: str | None, split: str = "train") -> tuple[list[dict], int]:
    """(rows as dicts, unparseable lines) of a .jsonl/.csv/.parquet file, a Hugging Face dataset or fedlora's
    generated benchmark."""
    if name == instruct_bench.NAME:
        return instruct_bench.generate(), 0
    if name in ("csv", "jsonl", "parquet"):
        file = _file(path)
        suffix = file.suffix.lower()
        if suffix in (".jsonl", ".json"):
            return _jsonl(file)
        import pandas as pd

        if suffix == ".parquet":
            return pd.read_parquet(file).to_dict("records"), 0
        bad: list = []
        frame = pd.read_csv(file, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False,
                            encoding="utf-8-sig", encoding_errors="replace", engine="python",
                            on_bad_lines=lambda line: bad.append(line))
        return frame.to_dict("records"), len(bad)
    return [dict(r) for r in _hub(name, split)], 0


def _file(path: str | None) -> Path:
    if not path or not Path(path).expanduser().is_file():
        raise UserError(f"data file not found: {path}")
    return Path(path).expanduser()


def _jsonl(file: Path) -> tuple[list[dict], int]:
    rows, bad = [], 0
    for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def _hub(name: str, split: str = "train"):
    from fedlora.data.hub import load_hub_dataset

    return load_hub_dataset(name, split)


def detect_format(columns: set[str], data_cfg) -> str | None:
    """The TRL format the columns spell, or None for the classic `prompt_column`/`response_column` records."""
    fmt = getattr(data_cfg, "format", "auto")
    if fmt != "auto":
        return None if fmt == "prompt-response" else fmt
    if "messages" in columns:
        return "messages"
    if data_cfg.response_column in columns and data_cfg.prompt_column in columns:
        return None
    if "prompt" in columns and "completion" in columns:
        return "prompt-completion"
    if "text" in columns:
        return "text"
    return None


def to_records(rows: list[dict], fmt: str, data_cfg, extra_bad: int = 0) -> Records:
    """Check and convert every row; each bad one is counted under the first reason it fails."""
    out = Records(fmt, rows_read=len(rows) + extra_bad)
    if extra_bad:
        out.bad["unparseable_line"] = extra_bad
    key_column = getattr(data_cfg, "partition_column", None)
    for row in rows:
        if key_column is not None and _blank(row.get(key_column)):
            out.bad["missing_partition_key"] += 1
            continue
        if fmt == "text":
            text = row.get("text")
            if _blank(text):
                out.bad["empty_text"] += 1
                continue
            out.texts.append(str(text))
        else:
            messages, reason = _conversation(row, fmt, data_cfg.system_prompt)
            if reason:
                out.bad[reason] += 1
                continue
            out.conversations.append(messages)
        out.keys.append("" if key_column is None else str(row[key_column]))
    return out


def _blank(value) -> bool:
    return value is None or (isinstance(value, float) and value != value) or not str(value).strip()


def _as_messages(value, default_role: str):
    """A cell as a list of messages: a JSON string (CSV cells), a list, or plain text in `default_role`."""
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("["):
            try:
                return json.loads(stripped)
            except json.JSONDecodeError:
                return None
        return [{"role": default_role, "content": value}]
    if hasattr(value, "tolist"):  # numpy arrays from Parquet
        value = value.tolist()
    return value if isinstance(value, list) else None


def _conversation(row: dict, fmt: str, default_system: str | None) -> tuple[list[dict], str | None]:
    if fmt == "messages":
        if _blank(row.get("messages")) and not isinstance(row.get("messages"), list):
            return [], "missing_messages"
        messages = _as_messages(row["messages"], "user")
    else:
        if _blank(row.get("prompt")) or _blank(row.get("completion")):
            return [], "empty_content"
        prompt, completion = _as_messages(row["prompt"], "user"), _as_messages(row["completion"], "assistant")
        messages = None if prompt is None or completion is None else prompt + completion
    if not messages:
        return [], "missing_messages"
    clean = []
    for m in messages:
        if not isinstance(m, dict) or _blank(m.get("role")):
            return [], "missing_role"
        if m["role"] not in ROLES:
            return [], "unknown_role"
        if _blank(m.get("content")):
            return [], "empty_content"
        clean.append({"role": str(m["role"]), "content": str(m["content"])})
    system = row.get("system")
    if clean[0]["role"] != "system":
        system = default_system if _blank(system) else str(system)
        if system:
            clean.insert(0, {"role": "system", "content": system})
    if not any(m["role"] == "assistant" for m in clean):
        return [], "no_assistant_turn"
    return clean, None
