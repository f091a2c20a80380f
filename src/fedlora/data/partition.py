"""Federated partitioning of a training set's labels into per-client index arrays.

iid, dirichlet and label-skew use flwr-datasets partitioners on an in-memory ``datasets.Dataset`` built
from the labels (plus an ``idx`` column that maps partition rows back to positions: no hub access).
``fractions`` is implemented here: flwr-datasets has no partitioner for fixed per-client label proportions.
"""

from __future__ import annotations


import warnings
from collections.abc import Callable, Sequence

import numpy as np
from fedlora.errors import UserError

from .key_and_quantity import by_key, quantity_skew

# Random draws that can fail (a Dirichlet client below min_size, a label-skew label left on no client)
# are restarted with seeds derived from the user's seed, at most this many times. flwr-datasets itself
# redraws a Dirichlet partition 10 more times inside each restart before raising.
RESTARTS = 20


def partition_indices(
    labels: np.ndarray,
    num_clients: int,
    scheme: str,
    *,
    alpha: float = 0.5,
    seed: int = 0,
    label_fractions: Sequence[Sequence[float]] | None = None,
    min_size: int = 1,
    classes_per_client: int | None = None,
) -> list[np.ndarray]:
    """Split positions ``0..len(labels)-1`` among ``num_clients`` clients; sorted int64 arrays, one per client.

    Schemes:
    - ``iid``: shuffled (by ``seed``) then cut into equal contiguous shards (flwr IidPartitioner).
    - ``dirichlet``: per-label client shares drawn from Dirichlet(``alpha``) (flwr DirichletPartitioner);
      smaller alpha = more skew. Redrawn until every client has at least ``min_size`` rows.
    - ``label-skew``: each client holds only ``classes_per_client`` labels (flwr PathologicalPartitioner,
      the paper's "first-deterministic" assignment); default 1 for binary data, else 2.
    - ``fractions``: client i gets label k in proportion ``label_fractions[i][k]``, all clients the same
      size, as large as the label counts allow. Rows left over are unused (the only incomplete scheme).
    - ``key``: each label value (a key: source, task, user) goes whole to one client, keys dealt to balance
      client sizes; needs at least as many keys as clients.
    - ``quantity``: iid content, client sizes in Dirichlet(``alpha``) proportions over clients (quantity skew).
    iid, dirichlet, label-skew, key and quantity are disjoint and complete. Deterministic for a given seed.
    """
    labels = _check_labels(labels)
    n = len(labels)
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)):
        raise UserError(f"num_clients must be an integer, got {num_clients!r}")
    if not 1 <= num_clients <= n:
        raise UserError(f"num_clients must lie in 1..{n} (the number of training rows), got {num_clients}")
    fn = _SCHEMES.get(scheme)
    if fn is None:
        raise UserError(f"unknown partition scheme '{scheme}'; known: {', '.join(_SCHEMES)}")
    if not alpha > 0:
        raise UserError(f"alpha must be > 0, got {alpha}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    if min_size < 0:
        raise UserError(f"min_size must be >= 0, got {min_size}")
    if num_clients * min_size > n:
        raise UserError(f"{num_clients} clients cannot each get min_size={min_size} of {n} rows")
    if label_fractions is not None and scheme != "fractions":
        raise UserError(f"label_fractions is only used by scheme 'fractions', not '{scheme}'")
    if classes_per_client is not None and scheme != "label-skew":
        raise UserError(f"classes_per_client is only used by scheme 'label-skew', not '{scheme}'")

    parts = fn(
        labels, int(num_clients), alpha=float(alpha), seed=int(seed), min_size=int(min_size),
        label_fractions=label_fractions, classes_per_client=classes_per_client,
    )
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def partition_stats(labels: np.ndarray, parts: Sequence[np.ndarray], num_labels: int | None = None) -> list[dict]:
    """Per client: ``client``, ``size``, ``label_counts`` (list by label id) and ``tv_from_global``.

    ``tv_from_global`` is the total-variation distance between the client's label distribution and the
    whole set's (0 = same mix, 1 = disjoint labels): one number for how skewed a client is.
    """
    labels = _check_labels(labels)
    k = int(num_labels if num_labels is not None else labels.max() + 1)
    global_dist = np.bincount(labels, minlength=k) / len(labels)
    stats = []
    for client, idx in enumerate(parts):
        counts = np.bincount(labels[np.asarray(idx, dtype=np.int64)], minlength=k)
        size = int(counts.sum())
        tv = 0.5 * float(np.abs(counts / size - global_dist).sum()) if size else float("nan")
        stats.append({"client": client, "size": size, "label_counts": counts.tolist(), "tv_from_global": tv})
    return stats


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise UserError("labels must be a non-empty 1-D array of label ids")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise UserError("labels must be non-negative integer label ids")
    return labels.astype(np.int64)


def _label_dataset(labels: np.ndarray):
    """In-memory datasets.Dataset: the label column to partition by, and each row's original position."""
    import datasets

    return datasets.Dataset.from_dict({"label": labels, "idx": np.arange(len(labels), dtype=np.int64)})


def _collect(partitioner, num_clients: int) -> list[np.ndarray]:
    # Slice, not partition["idx"]: a datasets 4 Column converts row by row, a slice in one batch.
    return [np.asarray(partitioner.load_partition(i)[:]["idx"], dtype=np.int64) for i in range(num_clients)]


def _restart_seed(seed: int, restart: int) -> int:
    """Restart 0 uses the seed itself, so a first-time success matches flwr-datasets called with it."""
    return seed if restart == 0 else int(np.random.SeedSequence([seed, restart]).generate_state(1)[0])


def _check_min_size(parts: list[np.ndarray], min_size: int, scheme: str) -> list[np.ndarray]:
    smallest = min(len(p) for p in parts)
    if smallest < min_size:
        raise UserError(
            f"{scheme} partition gives a client {smallest} rows, below min_size={min_size}; use fewer clients"
        )
    return parts


def _iid(labels: np.ndarray, num_clients: int, *, seed: int, min_size: int, **_: object) -> list[np.ndarray]:
    from flwr_datasets.partitioner import IidPartitioner

    # IidPartitioner cuts contiguous shards in row order; shuffle first so shards are random.
    partitioner = IidPartitioner(num_partitions=num_clients)
    partitioner.dataset = _label_dataset(labels).shuffle(seed=seed)
    return _check_min_size(_collect(partitioner, num_clients), min_size, "iid")


def _dirichlet(
    labels: np.ndarray, num_clients: int, *, alpha: float, seed: int, min_size: int, **_: object
) -> list[np.ndarray]:
    from flwr_datasets.partitioner import DirichletPartitioner

    dataset = _label_dataset(labels)
    last_error = ""
    for restart in range(RESTARTS):
        partitioner = DirichletPartitioner(
            num_partitions=num_clients, partition_by="label", alpha=alpha,
            min_partition_size=min_size, self_balancing=False, shuffle=True, seed=_restart_seed(seed, restart),
        )
        partitioner.dataset = dataset
        try:
            with warnings.catch_warnings():
                # It warns on every internal redraw; the outcome is what matters here.
                warnings.simplefilter("ignore", UserWarning)
                return _collect(partitioner, num_clients)
        except ValueError as exc:
            last_error = str(exc)
    raise UserError(
        f"dirichlet partition (alpha={alpha}, {num_clients} clients, {len(labels)} rows) left a client below "
        f"min_size={min_size} in {RESTARTS * 11} draws ({last_error.splitlines()[0]}); "
        "raise alpha or lower num_clients/min_size"
    )


def _label_skew(
    labels: np.ndarray, num_clients: int, *, seed: int, min_size: int, classes_per_client: int | None, **_: object
) -> list[np.ndarray]:
    from flwr_datasets.partitioner import PathologicalPartitioner

    present = np.unique(labels)
    k = classes_per_client if classes_per_client is not None else min(2, len(present) - 1)
    if not 1 <= k <= len(present):
        raise UserError(f"classes_per_client must lie in 1..{len(present)} (labels present), got {k}")
    if num_clients * k < len(present):
        raise UserError(
            f"label-skew with {num_clients} clients x {k} classes each cannot cover {len(present)} labels; "
            "use more clients or classes_per_client"
        )
    dataset = _label_dataset(labels)
    for restart in range(RESTARTS):
        # With fewer clients than labels the extra labels are drawn at random and may miss one;
        # redraw with a derived seed rather than silently dropping that label's rows.
        partitioner = PathologicalPartitioner(
            num_partitions=num_clients, partition_by="label", num_classes_per_partition=k,
            class_assignment_mode="first-deterministic", shuffle=True, seed=_restart_seed(seed, restart),
        )
        partitioner.dataset = dataset
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "classes will NOT be used": handled here
            parts = _collect(partitioner, num_clients)
        if sum(len(p) for p in parts) == len(labels):
            break
    else:
        raise UserError(
            f"label-skew with {num_clients} clients x {k} classes left a label on no client in {RESTARTS} draws; "
            "use more clients or classes_per_client"
        )
    return _check_min_size(parts, min_size, "label-skew")


def _fractions(
    labels: np.ndarray,
    num_clients: int,
    *,
    seed: int,
    min_size: int,
    label_fractions: Sequence[Sequence[float]] | None,
    **_: object,
) -> list[np.ndarray]:
    fractions = _check_fractions(label_fractions, num_clients, labels)
    counts = np.bincount(labels, minlength=fractions.shape[1])
    demand = fractions.sum(axis=0)  # rows of label k needed per unit of client size
    with np.errstate(divide="ignore"):
        size = int(np.floor(np.min(np.where(demand > 0, counts / demand, np.inf))))
    # Rounding each client's quotas can overshoot a label by a row or two; shrink until it fits.
    while size > 0:
        quotas = np.stack([_quota(row, size) for row in fractions])
        if np.all(quotas.sum(axis=0) <= counts):
            break
        size -= 1
    if size < max(min_size, 1):
        raise UserError(f"fractions partition: label counts {counts.tolist()} allow clients of only {size} rows")

    rng = np.random.default_rng(seed)
    pools = [rng.permutation(np.flatnonzero(labels == k)) for k in range(fractions.shape[1])]
    taken = np.zeros(fractions.shape[1], dtype=np.int64)
    parts = []
    for row in quotas:
        chunks = []
        for k, q in enumerate(row):
            chunks.append(pools[k][taken[k] : taken[k] + q])
            taken[k] += q
        parts.append(np.concatenate(chunks))
    return parts


def _check_fractions(label_fractions, num_clients: int, labels: np.ndarray) -> np.ndarray:
    if label_fractions is None:
        raise UserError("scheme 'fractions' needs label_fractions: one list of label proportions per client")
    try:
        fractions = np.asarray(label_fractions, dtype=np.float64)
    except ValueError:
        raise UserError("label_fractions must be a rectangular list of lists of numbers") from None
    if fractions.ndim != 2 or fractions.shape[0] != num_clients:
        raise UserError(f"label_fractions needs {num_clients} rows (one per client), got shape {fractions.shape}")
    if fractions.shape[1] <= int(labels.max()):
        raise UserError(f"label_fractions rows need {int(labels.max()) + 1} entries (one per label id)")
    if not np.all(np.isfinite(fractions)) or np.any(fractions < 0):
        raise UserError("label_fractions must be finite and non-negative")
    if not np.allclose(fractions.sum(axis=1), 1.0, atol=1e-6):
        raise UserError(f"each row of label_fractions must sum to 1, got sums {fractions.sum(axis=1).tolist()}")
    return fractions


def _quota(row: np.ndarray, size: int) -> np.ndarray:
    """Integer rows per label summing to ``size`` (largest-remainder rounding of ``row * size``)."""
    exact = row * size
    quota = np.floor(exact).astype(np.int64)
    spare = size - int(quota.sum())
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[:spare]] += 1
    return quota


# Scheme name -> implementation (registry, not an if/elif chain).
_SCHEMES: dict[str, Callable[..., list[np.ndarray]]] = {
    "iid": _iid,
    "dirichlet": _dirichlet,
    "label-skew": _label_skew,
    "fractions": _fractions,
    "key": by_key,
    "quantity": quantity_skew,
}
PARTITION_SCHEMES = tuple(_SCHEMES)
