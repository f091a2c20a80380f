"""In-process engine: clients train one after another on the run's own model, swapping adapters.

Deterministic for a seed: client sampling, batches, seeded A, DP noise all derive from `cfg.seed`.
"""

from __future__ import annotations

from fedlora.client import ClientTrainer, client_round
from fedlora.dp import SamplePrivacy
from fedlora.federated_run import RoundReplies, Run, Transport


class LocalTransport(Transport):
    """Delivers downlinks by function call. Clients share the run's model host (merges included) and keep
    their sample-level DP state here, across rounds and in the checkpoint."""

    def __init__(self, run: Run):
        self.trainer = ClientTrainer(run.cfg, run.host, run.strategy)
        states = {c: run.server.mechanism.client_state(run.cfg, len(d)) for c, d in enumerate(run.data.clients)}
        self.client_privacy: dict[int, SamplePrivacy] = {c: dp for c, dp in states.items() if dp is not None}

    def train(self, run: Run, clients: list[int]) -> RoundReplies:
        replies = RoundReplies([], {})
        for c in clients:
            out = client_round(self.trainer, c, run.server.downlink(c), run.data.clients[c], self.client_privacy.get(c))
            if isinstance(out, str):
                replies.dropped[c] = out
                run.progress.note(f"client {c}: {out}")
                continue
            replies.updates.append(out)
            run.progress.advance(out.steps)
        return replies

    def state_dict(self) -> dict:
        return {"client_privacy": {c: p.state_dict() for c, p in self.client_privacy.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.client_privacy = {int(c): SamplePrivacy.from_state_dict(d)
                               for c, d in state.get("client_privacy", {}).items()}


class LocalEngine:
    """engine=local: the run's loop over a `LocalTransport`."""

    def __init__(self, run: Run):
        self.run = run
        self.transport = LocalTransport(run)

    @property
    def trainer(self) -> ClientTrainer:
        return self.transport.trainer

    def execute(self) -> dict:
        return self.run.loop(self.transport)
