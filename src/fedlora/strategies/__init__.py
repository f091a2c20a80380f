"""Aggregation methods for federated LoRA, pure NumPy, one file per method, looked up by name.

    from fedlora.strategies import get_strategy
    result = get_strategy("rbla").aggregate(updates, weights)

A new method subclasses `Strategy` (the contract, in base.py) and registers itself with its options model
(registry.py): `@register("name", options=MyOptions)`.
"""

from .base import (
    WIRE_BYTES,
    AggregationResult,
    LoraFactors,
    Strategy,
    factors_nbytes,
    product_fro_norm,
    validate_updates,
    weighted_mean,
)
from .registry import (
    INTERNAL_OPTIONS,
    NoOptions,
    Options,
    available_strategies,
    get_strategy,
    register,
    strategy_class,
    strategy_options,
    unregister,
    validate_options,
)

# Importing a method's module registers it.
from . import fedit, ffa, rbla, zeropad, hetlora, flora, flexlora, fedex, lora_fair, fedsvd, rolora, fedsa, fedsb  # noqa: E402,F401,E501
from .hetlora import pruned_rank, tail_norm, tail_start  # noqa: E402
from .merge import merge_into_weight  # noqa: E402  (fedlora.lora.merge_base_delta's layout rule)

__all__ = [
    "INTERNAL_OPTIONS",
    "WIRE_BYTES",
    "AggregationResult",
    "LoraFactors",
    "NoOptions",
    "Options",
    "Strategy",
    "available_strategies",
    "factors_nbytes",
    "get_strategy",
    "merge_into_weight",
    "product_fro_norm",
    "pruned_rank",
    "register",
    "strategy_class",
    "strategy_options",
    "tail_norm",
    "tail_start",
    "unregister",
    "validate_options",
    "validate_updates",
    "weighted_mean",
]
