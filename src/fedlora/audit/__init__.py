"""Empirical privacy audits: canaries, their scores, and what the scores say about epsilon.

    from fedlora.audit import audit
    result = audit("exp.toml", overrides=["privacy.epsilon=3"], canaries=500)
    result.report["epsilon_lower_bound"]["epsilon"], result.report["epsilon_accountant"]

`stats` is the maths (NumPy/SciPy only); `canaries` the canary clients, as a transport wrapper; `run` the audited
run and its report. torch and transformers load only when an audit runs.
"""

from __future__ import annotations


def audit(config=None, **kwargs):
    """One audited run: see `fedlora.audit.run.audit`."""
    from fedlora.audit.run import audit as _audit

    return _audit(config, **kwargs)
