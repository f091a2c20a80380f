"""Empirical privacy audits: canaries, their scores, and what the scores say about epsilon.

    from fedlora.audit import audit
    result = audit("exp.toml", overrides=["privacy.epsilon=3"], canaries=500)
    result.report["epsilon_lower_bound"]["epsilon"], result.report["epsilon_accountant"]

`stats` is the maths (NumPy/SciPy only); `canaries` the canary clients, as a transport wrapper; `run` the audited
client-level run and its report; `gradient_canaries`, `input_canaries` and `sample_run` the sample-level (DP-SGD)
audit. torch and transformers load only when an audit runs.
"""

from __future__ import annotations


def audit(config=None, *, overrides=(), **kwargs):
    """One audited run of the configured experiment, by its privacy.mode: client-level DP
    (`fedlora.audit.run.audit`) or sample-level DP-SGD (`fedlora.audit.sample_run.audit_sample`)."""
    from fedlora.api import as_config
    from fedlora.errors import UserError

    cfg = as_config(config, overrides)
    if cfg.privacy.mode == "client":
        from fedlora.audit.run import audit as audit_client

        return audit_client(cfg, **kwargs)
    if cfg.privacy.mode == "sample":
        from fedlora.audit.sample_run import audit_sample

        return audit_sample(cfg, **kwargs)
    raise UserError("fedlora audit measures a DP run: set privacy.mode=client or privacy.mode=sample")
