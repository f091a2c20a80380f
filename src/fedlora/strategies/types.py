"""The NumPy types every method and the wire share: one module's factors, the parts of a LoRA that move in a
round, their shapes and their bytes on the wire (float32 per value)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

WIRE_BYTES = 4  # float32 on the wire


@dataclass(frozen=True)
class LoraFactors:
    """One module's LoRA factors: ΔW = scale · B @ A."""

    A: np.ndarray  # r x d_in
    B: np.ndarray  # d_out x r
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self) -> np.ndarray:
        return self.scale * (self.B @ self.A)


PART_NAMES = ("A", "B", "R")


@dataclass(frozen=True)
class Roles:
    """Which parts of a client's LoRA move in one round (ALGORITHMS-style: ΔW = s·B·A).

    - `train`: what local training updates ("A", "B"; Fed-SB: "R", the r x r core of A = R·A0);
    - `up`: what the client sends; the server fills every other part from its own reference (what it sent);
    - `down`: what the server sends; the client derives the rest from the seed (FFA's A, Fed-SB's A0 and B0)
      or keeps it itself (`personal`);
    - `personal`: parts a client trains, never sends and keeps across rounds (FedSA's B).
    """

    train: tuple[str, ...]
    up: tuple[str, ...]
    down: tuple[str, ...]
    personal: tuple[str, ...] = ()


def part_shape(part: str, rank: int, d_out: int, d_in: int) -> tuple[int, int]:
    """The shape of one part of a rank-`rank` LoRA on a d_out x d_in layer."""
    shapes = {"A": (rank, d_in), "B": (d_out, rank), "R": (rank, rank)}
    if part not in shapes:
        raise ValueError(f"unknown LoRA part {part!r}; expected one of {PART_NAMES}")
    return shapes[part]


def parts_nbytes(parts: Sequence[str], rank: int, dims: Mapping[str, tuple[int, int]]) -> int:
    """Wire bytes of `parts` for every module at `rank` (float32 per value)."""
    return WIRE_BYTES * sum(int(np.prod(part_shape(p, rank, d_out, d_in)))
                            for d_out, d_in in dims.values() for p in parts)
