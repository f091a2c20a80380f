"""Privacy accounting for one client: RDP or PRV (Opacus), calibration and budget checks.

One :class:`ClientAccountant` lives per client for the whole run (all rounds, and across a resume through
``state_dict``). Re-creating an accountant per round would forget earlier rounds and silently multiply the
real epsilon by the number of rounds, so the history is the only source of truth.
"""

from __future__ import annotations


import math
import warnings
from dataclasses import dataclass, field

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from fedlora.errors import UserError

__all__ = [
    "ACCOUNTANTS",
    "ClientAccountant",
    "calibrate_noise_multiplier",
    "validate_privacy_params",
    "would_exceed",
]

ACCOUNTANTS = {"rdp": RDPAccountant, "prv": PRVAccountant}

# Calibration aims this close to the target (relative); the verified band is [0.97, 1] x target.
_CALIBRATION_TOLERANCE = 0.005
_CALIBRATION_FLOOR = 0.97


def validate_privacy_params(
    epsilon: float | None = None,
    delta: float | None = None,
    clip: float | None = None,
    noise_multiplier: float | None = None,
) -> None:
    """Raise a one-line ValueError for the first invalid DP parameter; ``None`` means "not given"."""
    if epsilon is not None and not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"privacy epsilon must be a finite number > 0, got {epsilon!r}")
    if delta is not None and not (0 < delta < 1):
        raise ValueError(f"privacy delta must be in (0, 1), got {delta!r}")
    if clip is not None and not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"privacy clip must be a finite number > 0, got {clip!r}")
    if noise_multiplier is not None and not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"privacy noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")


def _validate_sampling(sample_rate: float, steps: int) -> None:
    if not (0 < sample_rate <= 1):
        raise ValueError(f"privacy sample_rate must be in (0, 1], got {sample_rate!r}")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"privacy steps must be an integer >= 0, got {steps!r}")


def _check_kind(kind: str) -> None:
    if kind not in ACCOUNTANTS:
        raise ValueError(f"privacy accountant must be one of {sorted(ACCOUNTANTS)}, got {kind!r}")


@dataclass
class ClientAccountant:
    """Composition history of one client's Poisson-subsampled Gaussian steps.

    ``history`` holds ``(noise_multiplier, sample_rate, steps)`` entries in Opacus' own format, so epsilon is
    always what the matching Opacus accountant reports for the same steps.
    """

    kind: str = "rdp"
    history: list[tuple[float, float, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_kind(self.kind)
        self.history = [(float(s), float(q), int(n)) for s, q, n in self.history]

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` DP steps; consecutive identical (sigma, q) entries are merged like Opacus does."""
        validate_privacy_params(noise_multiplier=noise_multiplier)
        _validate_sampling(sample_rate, steps)
        if steps == 0:
            return
        sigma, q = float(noise_multiplier), float(sample_rate)
        if self.history and self.history[-1][:2] == (sigma, q):
            self.history[-1] = (sigma, q, self.history[-1][2] + int(steps))
        else:
            self.history.append((sigma, q, int(steps)))

    @property
    def total_steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta``, from the Opacus accountant of this ``kind``."""
        validate_privacy_params(delta=delta)
        if not self.history:
            return 0.0
        # Zero noise gives no privacy at all; Opacus' formulas divide by sigma.
        if any(sigma == 0 for sigma, _, _ in self.history):
            return math.inf
        acc = ACCOUNTANTS[self.kind]()
        acc.history = list(self.history)
        return float(acc.get_epsilon(delta=delta))

    def copy(self) -> "ClientAccountant":
        return ClientAccountant(self.kind, list(self.history))

    def state_dict(self) -> dict:
        """JSON-serialisable state: ``{"kind": str, "history": [[sigma, q, steps], ...]}``."""
        return {"kind": self.kind, "history": [[s, q, n] for s, q, n in self.history]}

    @classmethod
    def from_state_dict(cls, d: dict) -> "ClientAccountant":
        try:
            kind, history = d["kind"], d["history"]
        except (KeyError, TypeError):
            raise ValueError("privacy accountant state must have keys 'kind' and 'history'") from None
        if any(len(entry) != 3 for entry in history):
            raise ValueError("privacy accountant history entries must be [noise_multiplier, sample_rate, steps]")
        return cls(kind, [tuple(entry) for entry in history])


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
) -> float:
    """Smallest-ish sigma whose epsilon after ``steps`` steps at rate ``sample_rate`` is in [0.97, 1] x target.

    Calibrate once for the total number of DP steps the client will take over all rounds; the result is
    verified with the same accountant used for reporting.
    """
    validate_privacy_params(epsilon=target_epsilon, delta=delta)
    _validate_sampling(sample_rate, steps)
    _check_kind(accountant)
    if steps == 0:
        return 0.0
    try:
        with warnings.catch_warnings():
            # The bisection probes huge sigmas on the way, for which RDP warns about its alpha range.
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            sigma = get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=int(steps),
                accountant=accountant,
                # Opacus' tolerance is absolute: make it relative to the target.
                epsilon_tolerance=_CALIBRATION_TOLERANCE * target_epsilon,
            )
    except ValueError as err:
        raise UserError(
            f"cannot reach privacy epsilon={target_epsilon} at delta={delta} with sample_rate={sample_rate} "
            f"and {steps} steps: {err}"
        ) from None
    eps = ClientAccountant(accountant, [(sigma, sample_rate, int(steps))]).epsilon(delta)
    if not (_CALIBRATION_FLOOR * target_epsilon <= eps <= target_epsilon):
        raise RuntimeError(
            f"noise calibration missed: sigma={sigma} gives epsilon={eps}, target {target_epsilon} ({accountant})"
        )
    return float(sigma)


def would_exceed(
    accountant: ClientAccountant,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    target_epsilon: float,
) -> bool:
    """True if taking ``steps`` more steps would push the client's epsilon above ``target_epsilon``.

    A client for which this is True must not train this round (the accountant is left untouched).
    """
    validate_privacy_params(epsilon=target_epsilon)
    trial = accountant.copy()
    trial.step(noise_multiplier, sample_rate, steps)
    return trial.epsilon(delta) > target_epsilon
