"""Privacy as a run uses it: the sample-level DP state of a client (`sample`), the server's mechanisms
(`mechanisms`: sampling, report checks, accounting, metrics) and the checks of client reports (`reports`).
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
from fedlora.dp.reports import MAX_HISTORY, check_privacy_report
from fedlora.dp.sample import SamplePrivacy, clip_groups, noise_seed

__all__ = ["MAX_HISTORY", "MECHANISMS", "ClientLevelDP", "PrivacyMechanism", "SampleLevelDP", "SamplePrivacy",
           "check_privacy_report", "client_level_calibration", "clip_groups", "make_mechanism", "max_epsilon",
           "noise_seed", "privacy_metrics"]
