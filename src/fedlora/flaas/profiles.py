"""Client profiles: what a device declares it has (memory, bandwidth, compute, availability).

A profile is input like any other: from the config (a list, a file, or a named population), or from a Flower
SuperNode's `--node-config`. Every value is checked (type, finite, within physical bounds); a bad one is one
line naming the key. A profile never chooses a rank: the server's planner does (fedlora.flaas.planner).
"""

from __future__ import annotations

import csv
import json
import tomllib
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# Physical bounds: anything outside is a typo or a lie, refused rather than planned around.
MAX_MEMORY_MB = 16 * 1024 * 1024  # 16 TiB
MAX_MBPS = 1e6  # 1 Tb/s
MAX_GFLOPS = 1e7  # 10 PFLOP/s sustained


class ClientProfile(BaseModel):
    """One device. Units are chosen for people: MiB, Mbit/s, GFLOP/s of sustained training throughput."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=False)

    memory_mb: float = Field(gt=0, le=MAX_MEMORY_MB)  # memory available to training (not the device's total)
    upload_mbps: float = Field(gt=0, le=MAX_MBPS)
    download_mbps: float = Field(gt=0, le=MAX_MBPS)
    gflops: float = Field(gt=0, le=MAX_GFLOPS)
    availability: float = Field(1.0, gt=0, le=1)  # probability the device is online in a given round
    device: str = Field("device", min_length=1, max_length=64)  # a label for reports (phone, laptop, ...)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bools(cls, v):
        if isinstance(v, bool):  # lax mode would read true as 1 MiB
            raise ValueError("got a boolean where a number is expected")
        return v


class ProfileError(ValueError):
    """A profile that cannot be used: one line naming the key."""


def parse_profile(raw: Mapping[str, Any], where: str = "profile") -> ClientProfile:
    """A validated profile from a mapping, or ProfileError with one line."""
    if not isinstance(raw, Mapping):
        raise ProfileError(f"{where}: expected a table of keys, got {type(raw).__name__}")
    try:
        return ClientProfile.model_validate(dict(raw))
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "?"
        msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
        raise ProfileError(f"{where}: {key}: {' '.join(msg.split())}") from None


# -- Flower --node-config ----------------------------------------------------------------------------------------
NODE_PREFIX = "flaas-"  # e.g. --node-config "partition-id=0 flaas-memory-mb=2048 flaas-upload-mbps=5 ..."
NODE_KEYS = {f"{NODE_PREFIX}{name.replace('_', '-')}": name for name in ClientProfile.model_fields}


def node_profile_fields(node_config: Mapping[str, Any]) -> dict[str, Any]:
    """The profile keys of a SuperNode's node config, as the node sends them to the server (unchecked here:
    the server checks what arrives)."""
    return {k: node_config[k] for k in NODE_KEYS if k in node_config}


def profile_from_node_fields(fields: Mapping[str, Any]) -> ClientProfile:
    """What a node declared (its `flaas-*` keys), checked: unknown `flaas-*` keys and bad values are refused."""
    unknown = sorted(k for k in fields if k not in NODE_KEYS)
    if unknown:
        raise ProfileError(f"node profile: unknown key {unknown[0]!r}; known: {', '.join(sorted(NODE_KEYS))}")
    return parse_profile({NODE_KEYS[k]: v for k, v in fields.items()}, "node profile")


# -- named populations -------------------------------------------------------------------------------------------
# Medians per device class and the share of clients in it. Chosen as plausible orders of magnitude for
# on-device training (memory left to an app, cellular vs home uplinks, sustained, not peak, FLOP/s), not
# measured: a trace file (load_profiles_file) is the way to bring measured numbers.
DEVICE_CLASSES: dict[str, dict[str, float]] = {
    "phone": dict(memory_mb=1536, upload_mbps=4, download_mbps=20, gflops=15, availability=0.7),
    "tablet": dict(memory_mb=3072, upload_mbps=10, download_mbps=50, gflops=40, availability=0.8),
    "laptop": dict(memory_mb=8192, upload_mbps=25, download_mbps=100, gflops=150, availability=0.9),
    "workstation": dict(memory_mb=32768, upload_mbps=100, download_mbps=500, gflops=2000, availability=0.95),
}
POPULATIONS: dict[str, tuple[tuple[str, float], ...]] = {
    "phones-tablets-laptops": (("phone", 0.5), ("tablet", 0.2), ("laptop", 0.3)),
    "phones": (("phone", 1.0),),
    "laptops-workstations": (("laptop", 0.7), ("workstation", 0.3)),
}
SPREAD = 0.35  # log-normal sigma of every value around its class median (devices of a class differ)


def population_profiles(name: str, num_clients: int, seed: int) -> list[ClientProfile]:
    """`num_clients` profiles of a named population: classes in their shares (largest remainder, in the
    population's order), each value drawn log-normally around its class median; deterministic per seed."""
    if name not in POPULATIONS:
        raise ProfileError(f"unknown population {name!r}; available: {', '.join(sorted(POPULATIONS))}")
    classes = POPULATIONS[name]
    counts = [int(share * num_clients) for _, share in classes]
    rest = sorted(range(len(classes)), key=lambda i: -(classes[i][1] * num_clients - counts[i]))
    for i in rest[:num_clients - sum(counts)]:
        counts[i] += 1
    rng = np.random.default_rng([seed, 0xF1AA5])
    out = []
    for (cls, _), count in zip(classes, counts):
        for _ in range(count):
            med = DEVICE_CLASSES[cls]
            drawn = {k: float(v * np.exp(SPREAD * rng.standard_normal())) for k, v in med.items()
                     if k != "availability"}
            out.append(ClientProfile(**drawn, availability=med["availability"], device=cls))
    return out


# -- files -------------------------------------------------------------------------------------------------------
# A FedScale-style device trace as CSV: one row per device, `computation` in ms per sample and `communication` in
# kbit/s (FedScale's client_device_capacity fields); the other profile keys may be columns too.
TRACE_COLUMNS = {"computation", "communication"}


def load_profiles_file(path: str | Path, flops_per_sample: float | None = None) -> list[ClientProfile]:
    """Profiles from a JSON list, a TOML file with `[[profiles]]`, or a CSV (profile keys as columns, or a
    FedScale-style trace: `computation` ms/sample and `communication` kbit/s, converted with the run's
    training FLOPs per sample, plus `memory_mb`)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"flaas.profiles_file {p}: cannot be read ({exc})") from None
    try:
        if p.suffix == ".json":
            rows = json.loads(text)
            rows = rows.get("profiles") if isinstance(rows, dict) else rows
        elif p.suffix == ".toml":
            rows = tomllib.loads(text).get("profiles")
        elif p.suffix == ".csv":
            rows = [_csv_row(r, flops_per_sample) for r in csv.DictReader(text.splitlines())]
        else:
            raise ProfileError(f"flaas.profiles_file {p}: expected .json, .toml or .csv")
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ProfileError(f"flaas.profiles_file {p}: not valid {p.suffix[1:].upper()} ({' '.join(str(exc).split())})") \
            from None
    if not isinstance(rows, list) or not rows:
        raise ProfileError(f"flaas.profiles_file {p}: expected a non-empty list of profiles")
    return [parse_profile(r, f"flaas.profiles_file {p.name} row {i}") for i, r in enumerate(rows)]


def _csv_row(row: dict[str, str], flops_per_sample: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in row.items():
        if k is None or v is None:
            raise ProfileError("flaas.profiles_file: a CSV row has more or fewer fields than the header")
        out[k.strip()] = v.strip() if k.strip() == "device" else _number(k, v)
    if TRACE_COLUMNS <= set(out):
        if flops_per_sample is None:
            raise ProfileError("flaas.profiles_file: a trace's `computation` needs the model's FLOPs per sample")
        ms, kbps = out.pop("computation"), out.pop("communication")
        if ms <= 0 or kbps <= 0:
            raise ProfileError("flaas.profiles_file: computation and communication must be > 0")
        out.setdefault("gflops", flops_per_sample / (ms / 1e3) / 1e9)
        out.setdefault("upload_mbps", kbps / 1e3)
        out.setdefault("download_mbps", kbps / 1e3)
    return out


def _number(key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ProfileError(f"flaas.profiles_file: {key.strip()}: not a number: {value.strip()!r}") from None
