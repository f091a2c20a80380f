"""Hugging Face datasets: ``datasets.load_dataset(name, split=split)`` without hanging when offline.

Unreachable hubs make ``load_dataset`` retry for ~25 s before failing. So a hub id is loaded like this:
- a local path, or ``HF_HUB_OFFLINE`` already set by the user: load directly (local files / cache only);
- otherwise probe the hub endpoint with a short timeout; reachable: load normally (downloads allowed);
  unreachable: load in offline mode for this one call, so a dataset already in the local cache still
  works and anything else fails at once.
"""

from __future__ import annotations

import os
import socket
import threading
from contextlib import contextmanager
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from .clean import RawRows

HUB_PROBE_TIMEOUT_S = 3.0
_HINT = "the embedded datasets are rotten_tomatoes and bbc_news, or use csv/jsonl with data.path"
_TRUE = {"1", "on", "yes", "true"}


def load_hub_rows(name: str, split: str, text_column: str, label_column: str) -> RawRows:
    """Rows of a Hugging Face dataset split; ClassLabel columns keep their ids and names."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise ValueError(f"could not load Hugging Face dataset {name}: {exc}; {_HINT}") from None

    offline_by_user = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE
    local = Path(name).expanduser().exists()
    force_offline = not (local or offline_by_user) and not hub_reachable()
    try:
        with _offline(force_offline):
            ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 - any loader failure becomes one clear line
        reason = _short_reason(exc)
        if force_offline:
            reason = f"Hugging Face Hub unreachable and not in the local cache ({reason})"
        raise ValueError(f"could not load Hugging Face dataset {name}: {reason}; {_HINT}") from None

    missing = [c for c in (text_column, label_column) if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"column '{missing[0]}' not found in Hugging Face dataset {name} "
            f"(columns: {', '.join(ds.column_names)}); set data.text_column / data.label_column"
        )
    feature = ds.features[label_column]
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    return RawRows(f"hf:{name}[{split}]", list(ds[text_column]), list(ds[label_column]), label_names=names)


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub endpoint opens within ``timeout`` seconds.

    Runs in a daemon thread because name resolution ignores socket timeouts and can stall.
    """
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


@contextmanager
def _offline(enabled: bool) -> Iterator[None]:
    """Offline mode for one call. Both libraries read HF_HUB_OFFLINE at import, so patch their constants."""
    if not enabled:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    saved = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _short_reason(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
