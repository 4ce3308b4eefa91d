"""Data: the built-in datasets (builtin.py), any dataset by name (datasets.py), what a model reads
(transforms.py), which samples a process reads in which order (samplers.py), and --data-pipeline gpu:
workers that read encoded images (encoded.py), decoded and augmented on the device (gpu_pipeline.py,
rand_augment.py), one batch ahead of the training step (prefetch.py)."""

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
from .encoded import EncodedBatch, EncodedImages, collate_encoded, encoded_images
from .gpu_pipeline import DevicePipeline, UnsupportedAugmentationError
from .prefetch import prefetched
from .samplers import ResumableSampler, SeededSamples, ShardSampler, first, sample
from .transforms import eval_transform, prepare, train_transform

__all__ = [
    "FASHION_MNIST_CLASSES",
    "DevicePipeline",
    "Digits",
    "EncodedBatch",
    "EncodedImages",
    "FashionMNIST",
    "ImageFilesSkippingCorrupt",
    "ImageFolderSkippingCorrupt",
    "InMemoryImages",
    "ResumableSampler",
    "SeededSamples",
    "ShardSampler",
    "UnsupportedAugmentationError",
    "class_count",
    "collate_encoded",
    "collate_skipping_none",
    "encoded_images",
    "eval_transform",
    "fashion_mnist_root",
    "first",
    "is_dataset_name",
    "open_dataset",
    "open_split",
    "prefetched",
    "prepare",
    "read_idx",
    "sample",
    "train_transform",
]
