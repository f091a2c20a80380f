"""Aggregation methods for federated LoRA, pure NumPy, one file per method, looked up by name.

    from fedlora.strategies import get_strategy
    result = get_strategy("rbla").aggregate(updates, weights)
"""

from .base import (
    WIRE_BYTES,
    AggregationResult,
    LoraFactors,
    Options,
    Strategy,
    available_strategies,
    factors_nbytes,
    get_strategy,
    product_fro_norm,
    register,
    strategy_options,
    validate_updates,
    weighted_mean,
)

# Importing a method's module registers it.
from . import fedit, ffa, rbla, zeropad, hetlora, flora, flexlora, fedex, lora_fair  # noqa: E402,F401
from .hetlora import pruned_rank, tail_norm, tail_start  # noqa: E402
from .merge import merge_into_weight  # noqa: E402

__all__ = [
    "WIRE_BYTES",
    "AggregationResult",
    "LoraFactors",
    "Options",
    "Strategy",
    "available_strategies",
    "factors_nbytes",
    "get_strategy",
    "merge_into_weight",
    "product_fro_norm",
    "pruned_rank",
    "register",
    "strategy_options",
    "tail_norm",
    "tail_start",
    "validate_updates",
    "weighted_mean",
]
