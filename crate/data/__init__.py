"""Data: the built-in datasets (builtin.py), any dataset by name (datasets.py), what a model reads
(transforms.py), and which samples a process reads in which order (samplers.py)."""

from .builtin import (
    FASHION_MNIST_CLASSES,
    Digits,
    FashionMNIST,
    InMemoryImages,
    fashion_mnist_root,
    read_idx,
)
from .datasets import (
    ImageFilesSkippingCorrupt,
    ImageFolderSkippingCorrupt,
    class_count,
    collate_skipping_none,
    is_dataset_name,
    open_dataset,
    open_split,
)
from .samplers import ResumableSampler, SeededSamples, ShardSampler, first, sample
from .transforms import eval_transform, prepare, train_transform

__all__ = [
    "FASHION_MNIST_CLASSES",
    "Digits",
    "FashionMNIST",
    "ImageFilesSkippingCorrupt",
    "ImageFolderSkippingCorrupt",
    "InMemoryImages",
    "ResumableSampler",
    "SeededSamples",
    "ShardSampler",
    "class_count",
    "collate_skipping_none",
    "eval_transform",
    "fashion_mnist_root",
    "first",
    "is_dataset_name",
    "open_dataset",
    "open_split",
    "prepare",
    "read_idx",
    "sample",
    "train_transform",
]
