"""The base of a round's stages."""

from __future__ import annotations

from fedlora.round.context import RoundContext


class Stage:
    """One step of the server's round. `reads_other_clients`: whether what it does to one client's update
    depends on other clients' updates (a median, a robust center). Under client-level DP no such stage may run
    before the clip: one client's presence would move what the others contribute (asserted by a test)."""

    name = ""
    reads_other_clients = False

    def run(self, server, ctx: RoundContext) -> None:  # pragma: no cover - abstract
        raise NotImplementedError
