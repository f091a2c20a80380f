"""A fixed, stratified train/test split."""

from __future__ import annotations


import numpy as np

from .types import TextDataset
from fedlora.errors import UserError


def stratified_split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) index arrays; each label contributes ``test_fraction`` of its rows to test.

    The test size is ``round(test_fraction * n)``, spread over labels by largest remainder, so every
    label's share of the test set is within one row of exact. A label never gives all its rows to test.
    """
    labels = np.asarray(labels).reshape(-1)
    if not 0.0 < float(test_fraction) < 1.0:
        raise UserError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    n = len(labels)
    classes, counts = np.unique(labels, return_counts=True)
    exact = test_fraction * counts
    n_test = np.floor(exact).astype(np.int64)
    spare = int(round(test_fraction * n)) - int(n_test.sum())
    # Hand the leftover test rows to the labels whose exact share was rounded down the most.
    for k in np.argsort(-(exact - n_test), kind="stable"):
        if spare <= 0:
            break
        if n_test[k] + 1 < counts[k]:
            n_test[k] += 1
            spare -= 1
    if n_test.sum() == 0 or n_test.sum() == n:
        raise UserError(f"test_fraction={test_fraction} leaves an empty train or test set for {n} rows")

    rng = np.random.default_rng(seed)
    test_parts = []
    for cls, k_test in zip(classes, n_test):
        members = np.flatnonzero(labels == cls)
        test_parts.append(rng.permutation(members)[:k_test])
    test = np.sort(np.concatenate(test_parts)).astype(np.int64)
    train = np.setdiff1d(np.arange(n, dtype=np.int64), test)
    return train, test


def stratified_split(ds: TextDataset, test_fraction: float, seed: int) -> tuple[TextDataset, TextDataset]:
    """(train, test) with label proportions kept, deterministic for a seed; rows keep their original order."""
    train, test = stratified_split_indices(ds.labels, test_fraction, seed)
    return ds.subset(train), ds.subset(test)
