"""One split of any dataset by name: the built-in ones, an ImageNet folder, an image folder, and every
dataset timm's factory or torchvision names; unreadable images skipped with their path logged."""

import logging
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import InvalidError, MissingError
from .builtin import Digits, FashionMNIST

log = logging.getLogger(__name__)


class ImageFilesSkippingCorrupt(Dataset):
    """Image files with their labels, ``samples`` [(path, class index)], read with PIL as RGB; an unreadable
    image (corrupt, truncated, not an image) is None, which ``collate_skipping_none`` drops: never
    replaced by another image. Its path is logged once and kept in ``skipped``, over every DataLoader
    worker and epoch: the flags live in shared memory, which forked or spawned workers write into."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], transform=None):
        self.samples, self.classes, self.transform = samples, classes, transform
        self.unreadable = torch.zeros(len(samples), dtype=torch.bool).share_memory_()

    @property
    def skipped(self) -> list[str]:
        """The paths of the unreadable images met so far, in sample order."""
        return [str(self.samples[index][0]) for index in self.unreadable.nonzero().flatten().tolist()]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            with Image.open(path) as file:
                image = file.convert("RGB")  # decodes the pixels: a truncated file fails here
        except Exception as error:  # PIL raises several types for corrupt files
            self.skip(index, error)
            return None
        return (self.transform(image) if self.transform else image), target

    def skip(self, index: int, error: Exception) -> None:
        """Mark image ``index`` unreadable, logging its path the first time."""
        if not self.unreadable[index]:
            self.unreadable[index] = True
            log.warning("skipping unreadable image %s: %s", self.samples[index][0], error)


class ImageFolderSkippingCorrupt(ImageFilesSkippingCorrupt):
    """torchvision's ImageFolder layout (root/<class>/*, classes in sorted order), unreadable images
    skipped as ``ImageFilesSkippingCorrupt`` does."""

    def __init__(self, root: str | Path, transform=None):
        from torchvision.datasets import ImageFolder

        folder = ImageFolder(str(root))
        super().__init__(folder.samples, folder.classes, transform)


def collate_skipping_none(batch: list):
    """default_collate over the samples that loaded; None marks a skipped (corrupt) image."""
    from torch.utils.data import default_collate

    kept = [sample for sample in batch if sample is not None]
    if not kept:
        return None
    return default_collate(kept)


# -- datasets by name: timm's factory and torchvision ------------------------------------------------------
# torchvision datasets that timm's factory does not cover: name -> (class, train split, evaluation split)
TORCHVISION_DATASETS = {
    "torchvision/flowers102": ("Flowers102", "train", "test"),  # the official fine-tuning's splits
    "torchvision/oxford_iiit_pet": ("OxfordIIITPet", "trainval", "test"),
}
TIMM_PREFIXES = ("torch/", "hfds/", "hfids/", "wds/", "tfds/")
NAMES = ("fashion-mnist", "digits", "imagenet", "folder", *TORCHVISION_DATASETS)  # and timm's prefixed ones


def open_dataset(
    name: str, root: str | Path, split: str, *, training: bool, download: bool = False, **kwargs
):
    """A dataset by name, without a transform (set ``dataset.transform`` afterwards):

    - ``torch/cifar10``, ``torch/cifar100``, ``torch/mnist``, ... , ``hfds/<hub name>`` (map-style),
      ``hfids/<hub name>``, ``wds/<name>``, ``tfds/<name>`` (streamed shards) through timm's
      ``create_dataset`` (split names as timm takes them: train / validation / test);
    - ``torchvision/flowers102``, ``torchvision/oxford_iiit_pet`` through torchvision ("train" and
      "validation" map to each one's train and test splits, as the official fine-tuning uses them);
    - ``folder``: an image folder, ``root/<split>/<class>/*`` (or ``root/<class>/*``).

    Nothing is downloaded unless ``download``; a missing dataset raises FileNotFoundError saying where
    it looked and which flag or folder fixes it.
    """
    root = Path(root)
    try:
        if name in TORCHVISION_DATASETS:
            return _torchvision_dataset(name, root, split, download)
        if name.startswith(TIMM_PREFIXES) or name == "folder":
            import timm.data

            timm_name = "" if name == "folder" else name
            dataset = timm.data.create_dataset(
                timm_name, root=str(root), split=split, is_training=training, download=download, **kwargs
            )
            return _skipping_corrupt(dataset)
    except (RuntimeError, FileNotFoundError, OSError, AssertionError) as error:
        if download:
            raise
        if name == "folder":  # timm's folder reader asserts that it found images
            raise MissingError(
                f"--data {root}: no images there (expected image files, in one sub-folder per class)"
            ) from error
        raise MissingError(
            f"dataset {name!r} ({split}) not found under {root}: {type(error).__name__}: {error}. "
            f"Pass --download to fetch it into {root}, or --data with the folder that holds it"
        ) from error
    raise InvalidError(
        f"unknown dataset {name!r}: use one of {', '.join(NAMES)}, or a timm name "
        f"({', '.join(TIMM_PREFIXES)}...)"
    )


def is_dataset_name(name: str) -> bool:
    """Whether ``name`` names a dataset (``open_split`` takes it), for telling a name from a folder."""
    return name in NAMES or name.startswith(TIMM_PREFIXES)


def _skipping_corrupt(dataset):
    """An image folder read by timm (its class order: natural sort of the folder names) with its
    unreadable images skipped, not replaced by the next image as timm's ImageDataset does."""
    from timm.data.readers.reader_image_folder import ReaderImageFolder

    reader = getattr(dataset, "reader", None)
    if not isinstance(reader, ReaderImageFolder):
        return dataset
    classes = sorted(reader.class_to_idx, key=reader.class_to_idx.get)
    return ImageFilesSkippingCorrupt(reader.samples, classes)


def _torchvision_dataset(name: str, root: Path, split: str, download: bool):
    import torchvision.datasets

    class_name, train_split, test_split = TORCHVISION_DATASETS[name]
    split = (
        train_split
        if split in ("train", "training")
        else test_split
        if split in ("validation", "val", "test")
        else split
    )
    dataset_class = getattr(torchvision.datasets, class_name)
    return dataset_class(str(root), split=split, download=download)


def class_count(dataset) -> int | None:
    """The number of classes a dataset declares (torchvision's ``classes``, timm readers'
    ``class_to_idx``), None when it does not say (streamed datasets without a class map)."""
    dataset = getattr(dataset, "dataset", dataset)  # a Subset
    classes = getattr(dataset, "classes", None)
    if classes:
        return len(classes)
    class_to_idx = getattr(getattr(dataset, "reader", None), "class_to_idx", None)
    return len(class_to_idx) if class_to_idx else None


# -- one split of any dataset, prepared for a model ---------------------------------------------------------
DEFAULT_DATA_ROOT = Path("data")  # where named datasets live (and --download puts them) without --data


def open_split(
    name: str,
    root: str | Path | None,
    split: str,
    *,
    training: bool,
    download: bool = False,
    labels_per_class: int = 0,
    seed: int = 0,
):
    """One split of a dataset, not yet prepared for a model (``prepare``): "fashion-mnist" and "digits"
    (built in; split "train" or anything else for the test split), "imagenet" (a folder with train/
    and val/: split "train" or anything else for val/), or a name ``open_dataset`` takes (root
    default: data/<name>)."""
    is_train = split in ("train", "training")
    if name == "fashion-mnist":
        return FashionMNIST(root, "train" if is_train else "test")
    if name == "digits":
        if labels_per_class and not is_train:
            labels_per_class = 0  # the few-label settings thin the training split only
        return Digits("train" if is_train else "test", labels_per_class, subset_seed=seed)
    if labels_per_class:
        raise InvalidError(f"labels_per_class is for the digits dataset, not {name!r}")
    if name == "imagenet":
        folder = Path(root or "") / ("train" if is_train else "val")
        if not folder.is_dir():
            raise MissingError(
                f"ImageNet not found: {folder} is not a folder. Pass --data with a folder holding train/ and "
                "val/ in torchvision's ImageFolder layout (one sub-folder per class)"
            )
        return ImageFolderSkippingCorrupt(folder)
    root = Path(root) if root else DEFAULT_DATA_ROOT / name.replace("/", "-")
    timm_options = dict(seed=seed) if name.startswith(TIMM_PREFIXES) else {}
    return open_dataset(name, root, split, training=training, download=download, **timm_options)
