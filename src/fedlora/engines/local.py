"""In-process engine: clients train one after another on the run's own model, swapping adapters.

Deterministic for a seed: client sampling, batches, seeded A, DP noise all derive from `cfg.seed`.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fedlora import compression
from fedlora.batched import BatchedRound, why_not_batched
from fedlora.batched_private import PrivateBatchedRound
from fedlora.client import ClientTrainer, client_round, evaluate, sits_out
from fedlora.client_state import CLIENT_STATE_DIR, ClientStateStore
from fedlora.dp import SamplePrivacy
from fedlora.federated_run import RoundReplies, Run, Transport


class LocalTransport(Transport):
    """Delivers downlinks by function call. Clients share the run's model host (merges included) and keep
    their sample-level DP state here, across rounds and in the checkpoint; what a method keeps on its clients
    (FedSA's B) is in the run folder's client-state/, per client and round, so a resume finds it."""

    def __init__(self, run: Run):
        self.trainer = ClientTrainer(run.cfg, run.host, run.strategy, ClientStateStore(run.run_dir / CLIENT_STATE_DIR))
        states = {c: run.server.mechanism.client_state(run.cfg, len(d)) for c, d in enumerate(run.data.clients)}
        self.client_privacy: dict[int, SamplePrivacy] = {c: dp for c, dp in states.items() if dp is not None}
        self._said_why = False

    def train(self, run: Run, clients: list[int]) -> RoundReplies:
        replies = RoundReplies([], {})
        lossy = compression.CompressionSpec.from_config(run.cfg).lossy
        up = up_head = 0
        for c, down, out in self._trained(run, clients):
            if isinstance(out, str):
                replies.dropped[c] = out
                run.progress.note(f"client {c}: {out}")
                continue
            if lossy:  # the server gets what the wire would carry: encoded by the client, decoded by the server
                start = compression.start_factors(self.trainer, down, c)
                payload, nbytes, nbytes_head = compression.compress_update(
                    run.cfg, run.strategy, out, start, down.head, self.trainer.store, down.round)
                factors, head = compression.decompress_update(run.server, c, payload)
                out = replace(out, factors=factors, head=head)
                up, up_head = up + nbytes, up_head + nbytes_head
            replies.updates.append(out)
            run.progress.advance(out.steps)
        if lossy:
            replies.extra.update(bytes_up=up, bytes_up_head=up_head)
        if run.cfg.privacy.secure_aggregation:
            return secure_replies(run, replies)
        return replies

    def _trained(self, run: Run, clients: list[int]):
        """(client, downlink, its update or why it sat out), in client order: the round's clients trained together
        when `federation.batched_clients` allows it and it stays exact, else one by one."""
        if self._batched(run, clients):
            downs = {c: run.server.downlink(c) for c in clients}
            if not self.client_privacy:
                updates = BatchedRound(self.trainer).train([(c, downs[c], run.data.clients[c]) for c in clients])
                yield from zip(clients, downs.values(), updates)
                return
            # DP-SGD: a client whose next round would pass its budget sits out, as in `client_round`.
            why = {c: sits_out(run.cfg, self.client_privacy[c]) for c in clients}
            ready = [c for c in clients if why[c] is None]
            trained = dict(zip(ready, PrivateBatchedRound(self.trainer).train(
                [(c, downs[c], run.data.clients[c], self.client_privacy[c]) for c in ready]))) if ready else {}
            for c in clients:
                yield c, downs[c], trained.get(c, why[c])
            return
        for c in clients:
            down = run.server.downlink(c)
            yield c, down, client_round(self.trainer, c, down, run.data.clients[c], self.client_privacy.get(c))

    def _batched(self, run: Run, clients: list[int]) -> bool:
        """Whether this round's clients train together (federation.batched_clients), saying once why not."""
        mode = run.cfg.federation.batched_clients
        if mode is False or len(clients) < 2:
            return False
        why = why_not_batched(self.trainer, run.server.round + 1, private=bool(self.client_privacy))
        if why is not None and mode is True and not self._said_why:
            run.progress.note(f"batched clients: training one by one ({why})")
            self._said_why = True
        return why is None

    def personal_eval(self, run: Run) -> tuple[float, int] | None:
        """Every client that has trained, with its own personal parts under the global ones, on the held-out set
        (the same examples as the global view, so the two read side by side)."""
        correct, weight, scored = 0.0, 0, 0
        for c, data in enumerate(run.data.clients):
            if not self.trainer.store.load(c, before_round=run.server.round + 1):
                continue  # never sampled: it has no personal model
            adapter = self.trainer.load(run.server.downlink(c), c)
            _, acc = evaluate(run.host, adapter, run.data.test, run.cfg.eval.batch_size)
            correct, weight, scored = correct + acc * len(data), weight + len(data), scored + 1
        return (correct / weight, scored) if scored else None

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


def secure_replies(run: Run, replies: RoundReplies) -> RoundReplies:
    """privacy.secure_aggregation in process: the round's updates become the sum SecAgg+ would unmask (the same
    quantization and modular sum, no masks: fedlora.secagg.secure_mean); the server gets only that."""
    from fedlora import secagg

    rng = np.random.default_rng([run.cfg.seed, run.server.round + 1, 0x5EC])
    summed = secagg.in_process_round(run.server, replies.updates, rng)
    if isinstance(summed, str):
        return replace(replies, updates=[], failed=summed)
    replies.extra.update(summed.extra)
    return replace(replies, updates=[], summed=summed)
