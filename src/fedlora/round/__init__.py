"""The server's round: an ordered pipeline of stages (`pipeline.py`) over a `RoundContext`."""

from fedlora.round.context import RoundContext
from fedlora.round.pipeline import RoundPipeline, build_stages

__all__ = ["RoundContext", "RoundPipeline", "build_stages"]
