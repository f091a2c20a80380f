"""Partitions that skew something other than label proportions: whole keys per client, and client sizes.

Both take the same arguments as the label partitioners in partition.py, which registers them."""

from __future__ import annotations

import numpy as np

from fedlora.errors import UserError


def by_key(labels: np.ndarray, num_clients: int, *, seed: int, min_size: int, **_: object) -> list[np.ndarray]:
    """Whole keys per client: every row of a key (label value: a source, task or user) on one client.

    Keys, in an order shuffled by ``seed``, largest first, each go to the client holding the fewest rows so far
    (balanced client sizes). Written here: flwr-datasets' NaturalIdPartitioner needs one client per key and
    GroupedNaturalIdPartitioner fixes the keys per client, not the number of clients."""
    keys, counts = np.unique(labels, return_counts=True)
    if len(keys) < num_clients:
        raise UserError(f"partition=key needs at least one key per client: {len(keys)} keys, {num_clients} clients")
    order = np.random.default_rng(seed).permutation(len(keys))
    order = order[np.argsort(-counts[order], kind="stable")]
    held: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    sizes = np.zeros(num_clients, dtype=np.int64)
    for k in order:
        client = int(np.argmin(sizes))
        held[client].append(np.flatnonzero(labels == keys[k]))
        sizes[client] += counts[k]
    parts = [np.concatenate(h) for h in held]
    return _at_least(parts, min_size, "key")


def quantity_skew(labels: np.ndarray, num_clients: int, *, alpha: float, seed: int, min_size: int,
                  **_: object) -> list[np.ndarray]:
    """Client sizes in Dirichlet(alpha) proportions (smaller alpha: more unequal), content iid.

    Sizes are largest-remainder roundings of the drawn proportions, raised to ``max(min_size, 1)`` each by taking
    from the largest client; rows are shuffled by ``seed`` and cut in those sizes by flwr-datasets'
    SizePartitioner (which takes sizes, it does not draw them)."""
    import datasets
    from flwr_datasets.partitioner import SizePartitioner

    n = len(labels)
    floor = max(min_size, 1)
    if num_clients * floor > n:
        raise UserError(f"{num_clients} clients cannot each get {floor} of {n} rows")
    rng = np.random.default_rng(seed)
    share = rng.dirichlet(np.full(num_clients, float(alpha)))
    exact = share * n
    sizes = np.floor(exact).astype(np.int64)
    sizes[np.argsort(-(exact - sizes), kind="stable")[: n - int(sizes.sum())]] += 1
    while sizes.min() < floor:  # ends: the sizes sum to n >= num_clients * floor
        sizes[int(np.argmin(sizes))] += 1
        sizes[int(np.argmax(sizes))] -= 1
    partitioner = SizePartitioner([int(x) for x in sizes])
    # SizePartitioner cuts in row order: shuffle first (as partition.py's iid does) so the content is iid.
    partitioner.dataset = datasets.Dataset.from_dict({"idx": np.arange(n, dtype=np.int64)}).shuffle(seed=seed)
    return [np.asarray(partitioner.load_partition(i)[:]["idx"], dtype=np.int64) for i in range(num_clients)]


def _at_least(parts: list[np.ndarray], min_size: int, scheme: str) -> list[np.ndarray]:
    smallest = min(len(p) for p in parts)
    if smallest < min_size:
        raise UserError(f"{scheme} partition gives a client {smallest} rows, below min_size={min_size}")
    return parts
