"""The server's round as one ordered pipeline, built once from the run's config and privacy mechanism:

    plain:        validate → own-norm-bound → [median-bound] → weighted-mean | robust-center → aggregate
                  → commit
    client DP:    validate → own-norm-bound → client-dp → aggregate → commit
    SecAgg:       check-members → secure-mean → aggregate → commit
    SecAgg + DP:  check-members → client-dp → aggregate → commit

(Decoding the wire and the compression codec happen before, where a transport turns replies into `Update`s;
evaluation, the metrics row and the checkpoint after, in `fedlora.Run.loop`.) A new feature adds a stage here,
not branches elsewhere. Under client-level DP no stage that reads other clients' updates runs before the clip.
"""

from __future__ import annotations

from fedlora.round.aggregate import Aggregate, Commit
from fedlora.round.bounds import MedianBound, OwnNormBound
from fedlora.round.client_dp import ClientDPRelease
from fedlora.round.combine import RobustCenter, SecureMean, WeightedMean
from fedlora.round.context import RoundContext
from fedlora.round.stage import Stage
from fedlora.round.validate import CheckMembers, Validate


def build_stages(cfg, client_dp: bool, secure: bool) -> list[Stage]:
    """The round's stages, in order (`client_dp`: the privacy mechanism clips on the server; `secure`: the round
    arrives as SecAgg's sum, or as SecAgg's failure to produce one)."""
    stages: list[Stage] = [CheckMembers()] if secure else [Validate(), OwnNormBound()]
    if client_dp:
        stages.append(ClientDPRelease())
    elif secure:
        stages.append(SecureMean())
    else:
        if cfg.federation.norm_bound_factor is not None:
            stages.append(MedianBound())
        stages.append(RobustCenter() if cfg.federation.aggregation != "mean" else WeightedMean())
    return stages + [Aggregate(), Commit()]


class RoundPipeline:
    def __init__(self, cfg, client_dp: bool, secure: bool):
        self.stages = build_stages(cfg, client_dp, secure)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def run(self, server, ctx: RoundContext) -> RoundContext:
        for stage in self.stages:
            stage.run(server, ctx)
        return ctx
