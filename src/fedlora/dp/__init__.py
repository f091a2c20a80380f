"""Privacy as a run uses it: the sample-level DP state of a client (`sample`), the server's mechanisms
(`mechanisms`: sampling, report checks, accounting, metrics); the report check itself is `fedlora.privacy.report_check`.
Clipping and noising updates under client-level DP is a stage of the round pipeline (`fedlora.round.client_dp`).
"""

from fedlora.dp.mechanisms import (
    MECHANISMS,
    ClientLevelDP,
    PrivacyMechanism,
    SampleLevelDP,
    client_level_calibration,
    make_mechanism,
    max_epsilon,
    privacy_metrics,
)
from fedlora.dp.sample import SamplePrivacy, clip_groups, noise_seed

__all__ = ["MECHANISMS", "ClientLevelDP", "PrivacyMechanism", "SampleLevelDP", "SamplePrivacy",
           "client_level_calibration", "clip_groups", "make_mechanism", "max_epsilon",
           "noise_seed", "privacy_metrics"]
