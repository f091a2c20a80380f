"""Hugging Face datasets: ``datasets.load_dataset(name, split=split)`` without hanging when offline.

Unreachable hubs make ``load_dataset`` retry for a minute or more before failing. So a hub id is loaded like this:
- decide first whether this load is offline: a local path, or ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` /
  ``TRANSFORMERS_OFFLINE`` set (by the user, or by ``fedlora.models``), or the hub endpoint not answering a
  short HTTP probe;
- offline: load with offline mode on for this one call (local files and the local cache only), so a dataset
  already in the cache still works and anything else fails at once with one line;
- otherwise load normally (downloads allowed).

huggingface_hub and datasets read their offline settings once, when they are imported. So offline mode is set
both in the environment, before ``datasets`` is imported, and in the two libraries' settings if they were
imported earlier (with other settings); both are put back after the call. Importing this module changes nothing.
"""

from __future__ import annotations


import http.client
import os
import sys
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from collections.abc import Iterator
from pathlib import Path

from .clean import RawRows
from fedlora.errors import UserError

HUB_PROBE_TIMEOUT_S = 3.0
_HINT = "the embedded datasets are rotten_tomatoes and bbc_news, or use csv/jsonl with data.path"
_TRUE = {"1", "on", "yes", "true"}  # as huggingface_hub and datasets read them


def load_hub_rows(name: str, split: str, text_column: str, label_column: str) -> RawRows:
    """Rows of a Hugging Face dataset split; ClassLabel columns keep their ids and names."""
    import datasets

    ds = load_hub_dataset(name, split)
    missing = [c for c in (text_column, label_column) if c not in ds.column_names]
    if missing:
        raise UserError(
            f"column '{missing[0]}' not found in Hugging Face dataset {name} "
            f"(columns: {', '.join(ds.column_names)}); set data.text_column / data.label_column"
        )
    feature = ds.features[label_column]
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    return RawRows(f"hf:{name}[{split}]", list(ds[text_column]), list(ds[label_column]), label_names=names)


def load_hub_dataset(name: str, split: str):
    """``datasets.load_dataset(name, split=split)``, offline when the hub is (see the module's note)."""
    local = Path(name).expanduser().exists()
    offline_by_env = _offline_in_env()
    offline = local or offline_by_env or not hub_reachable()
    with _offline(offline):
        try:
            import datasets  # here, not at the top: a first import must see this call's offline setting
        except ImportError as exc:  # pragma: no cover - datasets is a dependency
            raise UserError(f"could not load Hugging Face dataset {name}: {exc}; {_HINT}") from None
        try:
            ds = datasets.load_dataset(name, split=split)
        except Exception as exc:  # noqa: BLE001 - any loader failure becomes one clear line
            reason = _short_reason(exc)
            if offline and not (local or offline_by_env):
                reason = f"Hugging Face Hub unreachable and not in the local cache ({reason})"
            elif offline_by_env and not local:
                reason = f"offline mode ({_offline_variable()}) and not in the local cache ({reason})"
            raise UserError(f"could not load Hugging Face dataset {name}: {reason}; {_HINT}") from None
    return ds


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the hub endpoint answers an HTTP request within about ``timeout`` seconds (any status counts).

    An open TCP connection is not enough: an endpoint, or a firewall in front of it, that accepts connections
    and never answers makes every hub request time out and be retried. The probe uses the environment's proxy
    settings, as huggingface_hub does. It runs in a daemon thread because name resolution ignores socket
    timeouts and can stall.
    """
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    result: list[bool] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(endpoint + "/", method="HEAD"), timeout=timeout):
                result.append(True)
        except urllib.error.HTTPError:
            result.append(True)  # an error status is still an answer
        except (OSError, ValueError, http.client.HTTPException):
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def _is_true(value: str | None) -> bool:
    return value is not None and value.lower() in _TRUE


def _hub_offline_env() -> bool:
    """huggingface_hub's HF_HUB_OFFLINE as it reads it from the environment at import."""
    return _is_true(os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE"))


def _datasets_offline_env() -> bool:
    """datasets' HF_HUB_OFFLINE / HF_DATASETS_OFFLINE as it reads them at import: its own variable first."""
    value = os.environ.get("HF_DATASETS_OFFLINE")
    return _hub_offline_env() if value is None else _is_true(value)


def _offline_in_env() -> bool:
    return _hub_offline_env() or _datasets_offline_env()


def _offline_variable() -> str:
    """The environment variable that turned offline mode on, for the error message."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    return next((var for var in names if _is_true(os.environ.get(var))), names[0])


# The libraries' offline settings: (module, attribute, its value read from the environment at import).
_SETTINGS = (
    ("huggingface_hub.constants", "HF_HUB_OFFLINE", _hub_offline_env),
    ("datasets.config", "HF_HUB_OFFLINE", _datasets_offline_env),
    ("datasets.config", "HF_DATASETS_OFFLINE", _datasets_offline_env),
)
_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@contextmanager
def _offline(enabled: bool) -> Iterator[None]:
    """Offline mode for one call, whether or not huggingface_hub / datasets are imported yet.

    Sets HF_HUB_OFFLINE and HF_DATASETS_OFFLINE in the environment (read by a first import inside the call) and
    in the modules already imported; afterwards restores the environment, restores the modules that were already
    imported, and gives modules first imported during the call the settings the restored environment gives.
    Process-wide while it lasts: another thread loading from the hub at the same time is offline too.
    """
    if not enabled:
        yield
        return
    saved_env = {var: os.environ.get(var) for var in _ENV}
    saved = {(mod, attr): getattr(sys.modules[mod], attr) for mod, attr, _ in _SETTINGS
             if mod in sys.modules and hasattr(sys.modules[mod], attr)}
    os.environ.update({var: "1" for var in _ENV})
    for mod, attr in saved:
        setattr(sys.modules[mod], attr, True)
    try:
        yield
    finally:
        for var, value in saved_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        for mod, attr, from_env in _SETTINGS:
            if (mod, attr) in saved:
                setattr(sys.modules[mod], attr, saved[(mod, attr)])
            elif mod in sys.modules and hasattr(sys.modules[mod], attr):
                setattr(sys.modules[mod], attr, from_env())


def _short_reason(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
