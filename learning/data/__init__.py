"""Datasets (no downloads), partitioners and a registry of both by name."""

from learning.data.cifar import cifar10, read_batch
from learning.data.datasets import Dataset, digits, mnist1d, synthetic
from learning.data.partition import PAPER_TABLE6, Partition, partition
from learning.data.registry import dataset_names, has_dataset, load_dataset, register_dataset

__all__ = [
    "PAPER_TABLE6",
    "Dataset",
    "Partition",
    "cifar10",
    "dataset_names",
    "digits",
    "has_dataset",
    "load_dataset",
    "mnist1d",
    "partition",
    "read_batch",
    "register_dataset",
    "synthetic",
]
