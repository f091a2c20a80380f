"""State a client keeps between rounds and never sends: FedSA's personal B, top-k's error-feedback residual.

One store per client process (or per simulation). State is a flat dict of named float arrays, saved per round:
`save(cid, t, state)` after the client's round t, `load(cid, before_round=t)` before round t returns what was
saved at the latest round < t. Keying by round is what makes resume exact: a run killed after a client saved
round t+1 but before the server checkpointed round t+1 redoes round t+1 from the round-t state, ignoring the
orphaned file. The last `keep` rounds per client are kept (older ones are removed on save).

Files: `<root>/client-<cid>/round-<t>.npz`, written to a temporary name and renamed (atomic on POSIX). With
`root=None` the store lives in memory (library use, tests).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

CLIENT_STATE_DIR = "client-state"  # the store's folder inside a run folder (engines local and flower-sim)
_ROUND_FILE = re.compile(r"^round-(\d+)\.npz$")


class ClientStateStore:
    def __init__(self, root: Path | str | None = None, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = None if root is None else Path(root)
        self.keep = keep
        self._memory: dict[int, dict[int, dict[str, np.ndarray]]] = {}

    def save(self, client_id: int, round_idx: int, state: dict[str, np.ndarray]) -> None:
        """Keep `state` as client `client_id`'s state after round `round_idx` (an empty state is kept too)."""
        arrays = {str(k): np.array(v, copy=True) for k, v in state.items()}
        if self.root is None:
            rounds = self._memory.setdefault(int(client_id), {})
            rounds[int(round_idx)] = arrays
            for old in sorted(rounds)[: -self.keep]:
                del rounds[old]
            return
        folder = self._folder(client_id)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"round-{int(round_idx)}.npz"
        tmp = folder / f".round-{int(round_idx)}.npz.tmp"
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        for old in self._rounds_on_disk(client_id)[: -self.keep]:
            (folder / f"round-{old}.npz").unlink(missing_ok=True)

    def load(self, client_id: int, before_round: int) -> dict[str, np.ndarray]:
        """The state saved at the latest round < `before_round`; {} when there is none (a client's first round)."""
        if self.root is None:
            rounds = self._memory.get(int(client_id), {})
            usable = [t for t in rounds if t < before_round]
            return {k: v.copy() for k, v in rounds[max(usable)].items()} if usable else {}
        usable = [t for t in self._rounds_on_disk(client_id) if t < before_round]
        if not usable:
            return {}
        with np.load(self._folder(client_id) / f"round-{max(usable)}.npz", allow_pickle=False) as z:
            return {k: np.array(z[k]) for k in z.files}

    def in_memory(self) -> dict[int, dict[int, dict[str, np.ndarray]]]:
        """client -> round -> state, of a store without a folder (to persist it elsewhere, e.g. Flower's state)."""
        if self.root is not None:
            raise ValueError("this store is on disk")
        return self._memory

    def _folder(self, client_id: int) -> Path:
        assert self.root is not None
        return self.root / f"client-{int(client_id)}"

    def _rounds_on_disk(self, client_id: int) -> list[int]:
        folder = self._folder(client_id)
        if not folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _ROUND_FILE.match(p.name)))
