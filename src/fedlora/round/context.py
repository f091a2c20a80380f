"""What one round's stages read and write."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedlora.protocol import SummedRound, Update


@dataclass
class RoundContext:
    """The state of the round being finished, handed from stage to stage in the pipeline's order."""

    round: int  # 1-based number of the round being finished
    sampled: list[int]
    updates: list[Update] = field(default_factory=list)  # the replies as received (plain rounds)
    summed: SummedRound | None = None  # secure aggregation: the round's sum and its members' metadata
    failed: str | None = None  # why the round has no sum to use (SecAgg halted, a member that does not check out)
    rejected: dict[int, str] = field(default_factory=dict)  # client -> why its reply was not used
    norms: dict[int, float] = field(default_factory=dict)  # client -> L2 norm of its change (what it sends)
    contributors: list[Update] = field(default_factory=list)  # valid updates (or the sum's members)
    inputs: list[dict] = field(default_factory=list)  # what the strategy aggregates: module -> LoraFactors each
    weights: list[float] = field(default_factory=list)
    head: dict[str, np.ndarray] | None = None  # the aggregated head, when the round has one
    result: object = None  # the strategy's AggregationResult
    extra: dict = field(default_factory=dict)  # stage facts for the metrics row
    release: dict | None = None  # client-level DP: the noisy mean change released this round (fixed coordinates)
    bytes_up: int = 0
    bytes_up_head: int = 0
