"""Privacy as a run uses it, server side: one `PrivacyMechanism` per mode (`privacy.mode`). A mechanism decides
how clients are sampled, checks what clients report, accounts each round and writes the DP columns of a metrics
row. It does not touch updates: clipping and noise are the round pipeline's client-DP stage
(`fedlora.round.client_dp`), the same code with and without secure aggregation.

- "none": no privacy.
- "sample": DP-SGD on every client (`fedlora.dp.sample`); the server keeps each client's last report.
- "client": DP-FedAvg (`ClientLevelDP`): Poisson client sampling, one accountant for the federation, and the
  generator of the server's noise (OS entropy unless privacy.reproducible_noise).
"""

from __future__ import annotations

import math

import numpy as np

from fedlora.config import ExperimentConfig
from fedlora.dp.sample import SamplePrivacy, noise_seed
from fedlora.privacy import ClientAccountant, calibrate_noise_multiplier
from fedlora.privacy.report_check import VerifiedReport, verify_report


def client_level_calibration(cfg: ExperimentConfig) -> tuple[float, float]:
    """(sigma, q) for DP-FedAvg: Poisson rate q = clients_per_round / num_clients, one step per round."""
    p, fed = cfg.privacy, cfg.federation
    q = fed.per_round() / fed.num_clients
    sigma = p.noise_multiplier
    if sigma is None:
        sigma = calibrate_noise_multiplier(p.epsilon, p.delta, q, fed.rounds, p.accountant)
    return float(sigma), q


def max_epsilon(reports: dict[int, dict]) -> tuple[int, dict] | None:
    """The client with the largest epsilon so far and its report."""
    if not reports:
        return None
    cid = max(reports, key=lambda c: (reports[c]["epsilon"] if math.isfinite(reports[c]["epsilon"]) else math.inf))
    return cid, reports[cid]


def noise_label(cfg: ExperimentConfig) -> str:
    """Where the DP noise comes from, as the metrics and the README name it."""
    return "reproducible (research option: anyone with the config can regenerate it)" \
        if cfg.privacy.reproducible_noise else "os-entropy"


def privacy_metrics(cfg: ExperimentConfig, reports: dict[int, dict]) -> dict:
    """The DP columns of a metrics row: epsilon is the max over clients, with that client's sigma, q, steps."""
    if cfg.privacy.mode == "none":
        return {}
    base = {"delta": cfg.privacy.delta, "accountant": cfg.privacy.accountant, "privacy": cfg.privacy.mode,
            "noise": noise_label(cfg)}
    top = max_epsilon(reports)
    if top is None:
        return {"epsilon": 0.0, **base}
    cid, rep = top
    return {
        "epsilon": rep["epsilon"],
        "noise_multiplier": rep["noise_multiplier"],
        "sample_rate": rep["sample_rate"],
        "dp_steps": rep["dp_steps"],
        "dp_steps_max": max(r["dp_steps"] for r in reports.values()),
        "epsilon_client": cid,
        **base,
    }


class PrivacyMechanism:
    """No privacy. The base of every mode: each hook is a no-op here."""

    mode = "none"
    client_reports = False  # clients send a privacy report (their own accountant) with each update
    clips_on_server = False  # the round pipeline runs the client-DP stage (clip, noise on the sum)

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg

    @classmethod
    def client_state(cls, cfg: ExperimentConfig, num_examples: int) -> SamplePrivacy | None:
        """The DP state one client trains with (kept by whoever hosts the client, across rounds)."""
        return None

    def sample_clients(self, num_clients: int, rng: np.random.Generator) -> list[int] | None:
        """This round's clients, when the mechanism's analysis needs its own sampling; None: the default."""
        return None

    def check_report(self, update, previous: dict | None, client_size: int, round_idx: int) -> dict | str | None:
        """The privacy report a client sent, as the server verified it (a dict rebuilt from parsed values), or
        why it must be rejected (a string), or None when the mode has no reports."""
        return None

    def record_reports(self, reports: dict[int, dict], updates: list) -> None:
        """Keep what the round's clients reported (sample-level DP)."""

    def account_round(self) -> None:
        """Charge the accountant for one released round (client-level DP)."""

    def metrics(self, reports: dict[int, dict]) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


class SampleLevelDP(PrivacyMechanism):
    """DP-SGD on every client; the server keeps each client's last report (epsilon, accountant state)."""

    mode = "sample"
    client_reports = True

    @classmethod
    def client_state(cls, cfg: ExperimentConfig, num_examples: int) -> SamplePrivacy:
        return SamplePrivacy.for_client(cfg, num_examples)

    def __init__(self, cfg: ExperimentConfig):
        super().__init__(cfg)
        self._pairs: dict[int, tuple[float, float]] = {}  # client size -> the (sigma, q) the config gives it

    def expected_pair(self, client_size: int) -> tuple[float, float]:
        """(sigma, q) a client of this size trains with (`SamplePrivacy.for_client`), computed once per size."""
        if client_size not in self._pairs:
            state = SamplePrivacy.for_client(self.cfg, client_size)
            self._pairs[client_size] = (state.noise_multiplier, state.sample_rate)
        return self._pairs[client_size]

    def check_report(self, update, previous: dict | None, client_size: int, round_idx: int) -> dict | str:
        """The client's report verified by the server: every field parsed, the history continuing the last
        verified one at the (sigma, q) the config gives this client, epsilon recomputed with the server's own
        accountant (a disagreeing claim is refused). What is kept is rebuilt from parsed values only."""
        p = self.cfg.privacy
        try:
            before = VerifiedReport.from_dict(previous) if previous is not None else None
        except ValueError as exc:  # the server's own stored state: a bug, not the client's fault
            raise RuntimeError(f"stored privacy report of client {update.client_id} is unreadable: {exc}") from None
        steps = self.cfg.local_steps()
        verified = verify_report(update.privacy, before, delta=p.delta, accountant=p.accountant,
                                 expected_steps=steps, max_steps=round_idx * steps,
                                 expected_pair=self.expected_pair(client_size))
        return verified if isinstance(verified, str) else verified.to_dict()

    def record_reports(self, reports: dict[int, dict], updates: list) -> None:
        for u in updates:
            reports[u.client_id] = u.privacy  # the verified dict `check_report` returned (see round.validate)

    def metrics(self, reports: dict[int, dict]) -> dict:
        return privacy_metrics(self.cfg, reports)


class ClientLevelDP(PrivacyMechanism):
    """DP-FedAvg (McMahan et al. 2018), the server's half.

    - Sampling: each client joins a round independently with probability q = clients_per_round / num_clients
      (Poisson), the model the subsampled-Gaussian accountant analyses.
    - Clip and noise: the round pipeline's client-DP stage, with this mechanism's sigma and noise generator.
    - Accounting: every round that releases anything is charged (sigma, q, 1 step), whatever its size; one
      accountant serves the federation (every client's history is the same).
    """

    mode = "client"
    clips_on_server = True

    def __init__(self, cfg: ExperimentConfig):
        super().__init__(cfg)
        self.sigma, self.q = client_level_calibration(cfg)
        self.accountant = ClientAccountant(cfg.privacy.accountant)
        self.report: dict | None = None
        self.noise_rng = np.random.default_rng(np.random.SeedSequence(noise_seed(cfg)))

    def sample_clients(self, num_clients: int, rng: np.random.Generator) -> list[int]:
        return [int(c) for c in np.flatnonzero(rng.random(num_clients) < self.q)]

    def expected_clients(self) -> float:
        return self.q * self.cfg.federation.num_clients

    def account_round(self) -> None:
        self.accountant.step(self.sigma, self.q, 1)
        self.report = None  # epsilon is recomputed when it is next asked for (one Opacus call per metrics row)

    def current_report(self) -> dict | None:
        if self.report is None and self.accountant.total_steps > 0:
            self.report = {"epsilon": self.accountant.epsilon(self.cfg.privacy.delta), "noise_multiplier": self.sigma,
                           "sample_rate": self.q, "dp_steps": self.accountant.total_steps}
        return self.report

    def metrics(self, reports: dict[int, dict]) -> dict:
        p = self.cfg.privacy
        out = {"delta": p.delta, "accountant": p.accountant, "privacy": self.mode, "noise": noise_label(self.cfg)}
        report = self.current_report()
        if report is None:
            return {"epsilon": 0.0, **out}
        return {**report, "dp_steps_max": report["dp_steps"], **out}

    def state_dict(self) -> dict:
        # The noise generator's state is the server's secret: it lives in the private checkpoint only.
        return {"accountant": self.accountant.state_dict(), "report": self.current_report(),
                "noise_rng": self.noise_rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        if "accountant" in state:
            self.accountant = ClientAccountant.from_state_dict(state["accountant"])
            self.report = state.get("report")
        if "noise_rng" in state:
            self.noise_rng.bit_generator.state = state["noise_rng"]


MECHANISMS: dict[str, type[PrivacyMechanism]] = {"none": PrivacyMechanism, "sample": SampleLevelDP,
                                                  "client": ClientLevelDP}


def make_mechanism(cfg: ExperimentConfig) -> PrivacyMechanism:
    return MECHANISMS[cfg.privacy.mode](cfg)
