"""Datasets and federated partitioning: plain arguments in, numpy arrays and small dataclasses out (no torch)."""

from .loaders import EMBEDDED_DATASETS, FILE_FORMATS, load_text_dataset
from .partition import PARTITION_SCHEMES, partition_indices, partition_stats
from .split import stratified_split, stratified_split_indices
from .types import LoadReport, TextDataset

__all__ = [
    "EMBEDDED_DATASETS",
    "FILE_FORMATS",
    "PARTITION_SCHEMES",
    "LoadReport",
    "TextDataset",
    "load_text_dataset",
    "partition_indices",
    "partition_stats",
    "stratified_split",
    "stratified_split_indices",
]
