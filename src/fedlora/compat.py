"""Which features run together: every cross-feature refusal, declared next to the feature it belongs to and
checked here, in one place, for every entry point (a config file, CLI overrides, `fedlora.run` with a strategy
instance, a config edited in code after loading, Flower's ServerApp). Each rule reads the config and the
strategy *instance* the run will use, and returns why they cannot run together (one line), or None.
"""

from __future__ import annotations

from typing import Callable

from fedlora.secagg import config_refusal as secagg_refusal


def _mixed_ranks(cfg, strategy) -> str | None:
    ranks = sorted(set(cfg.client_ranks()))
    if len(ranks) > 1 and not strategy.supports_mixed_ranks:
        from fedlora.strategies import available_strategies, strategy_class

        mixed = [n for n in available_strategies() if strategy_class(n).supports_mixed_ranks]
        return (f"strategy {strategy.name!r} cannot aggregate clients of different ranks {ranks}: "
                f"{strategy.mixed_ranks_refusal}; use one of {', '.join(mixed)}")
    return None


def _sample_dp(cfg, strategy) -> str | None:
    if cfg.privacy.mode != "sample":
        return None
    if strategy.sample_dp_refusal:
        return f"strategy {strategy.name!r} cannot run with privacy.mode=sample: {strategy.sample_dp_refusal}"
    if cfg.model.gradient_checkpointing:
        return ("model.gradient_checkpointing does not work with privacy.mode=sample: Opacus' per-example "
                "gradient hooks would see every recomputed activation twice")
    if cfg.federation.batching == "length-buckets":
        return ("federation.batching=length-buckets does not work with privacy.mode=sample: DP-SGD's accounting "
                "needs its Poisson-sampled batches")
    return None


def _client_dp(cfg, strategy) -> str | None:
    """Client-level DP releases one noisy sum per round (fedlora.round.client_dp): the method's aggregate must
    be a sum of what clients send. A method that reads clients one by one would need each update noised on its
    own, and the number of noisy updates released would itself tell who took part."""
    if cfg.privacy.mode != "client" or strategy.linear:
        return None
    return (f"privacy.mode=client needs a method whose aggregate is a sum of the uploads; {strategy.name!r} reads "
            "each client's update on its own (use privacy.mode=sample, or ffa, fedit, zeropad, rbla with gamma=0, "
            "fedsvd, rolora, fedsa, fedsb)")


def _robust(cfg, strategy) -> str | None:
    if cfg.federation.aggregation == "mean":
        return None
    why = ("it needs a linear method" if not strategy.linear else "it needs one rank for all clients"
           if len(set(cfg.client_ranks())) > 1 else "client-level DP's clip and noise assume the mean"
           if cfg.privacy.mode == "client" else None)
    return f"federation.aggregation={cfg.federation.aggregation!r} does not fit this run: {why}" if why else None


def _quantized_base(cfg, strategy) -> str | None:
    if cfg.model.quantize == "none":
        return None
    if cfg.task != "causal-lm":
        return "model.quantize is for task=causal-lm (a classifier's head is trained in full)"
    if strategy.merges_into_base:
        return (f"strategy {strategy.name!r} merges deltas into the base weights, which a quantized base cannot "
                "take: use model.quantize=none")
    return None


def _text_groups(cfg, strategy) -> str | None:
    if cfg.federation.partition in ("clusters", "length") and cfg.task != "causal-lm":
        return (f"federation.partition={cfg.federation.partition} groups instruction records (task=causal-lm); a "
                "classifier's partitions skew its labels: use dirichlet, label-skew, fractions, iid or quantity")
    return None


def _secure_aggregation(cfg, strategy) -> str | None:
    return secagg_refusal(cfg, strategy) if cfg.privacy.secure_aggregation else None


def _flaas(cfg, strategy) -> str | None:
    """A straggler is dropped after it trained (fedlora.flaas.service); SecAgg's sum cannot drop a member."""
    f = cfg.flaas
    if f is not None and f.simulate and f.deadline_s is not None and cfg.privacy.secure_aggregation:
        return ("flaas.deadline_s cannot drop stragglers from a secure sum (privacy.secure_aggregation): "
                "leave flaas.deadline_s unset, or flaas.simulate = false")
    return None


RULES: dict[str, Callable] = {
    "mixed ranks": _mixed_ranks,
    "sample-level DP": _sample_dp,
    "client-level DP": _client_dp,
    "robust aggregation": _robust,
    "quantized base": _quantized_base,
    "partition by text groups": _text_groups,
    "secure aggregation": _secure_aggregation,
    "flaas": _flaas,
}


def refusal(cfg, strategy) -> str | None:
    """The first reason this config cannot run with this strategy instance, or None."""
    for rule in RULES.values():
        why = rule(cfg, strategy)
        if why:
            return why
    return None
