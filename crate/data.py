"""Datasets: Fashion-MNIST from its IDX files (the built-in demo data) and ImageNet-style image folders.

Fashion-MNIST is read from the files that the Debian package dataset-fashion-mnist installs
(/usr/share/datasets/fashion-mnist); the option ``--data`` or the environment variable
CRATE_FASHION_MNIST points elsewhere. Nothing is ever downloaded.
"""

import gzip
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

FASHION_MNIST_DEFAULT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "CRATE_FASHION_MNIST"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as an array; a malformed file raises ValueError naming it."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise ValueError(f"cannot read IDX file {path}: {error}") from error
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path} is truncated or corrupt: {len(data)} bytes, the header implies {expected}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def fashion_mnist_root(root: str | Path | None = None) -> Path:
    """The folder holding the Fashion-MNIST IDX files: ``root``, else $CRATE_FASHION_MNIST, else the
    Debian package's folder. Missing data raises FileNotFoundError saying where it looked."""
    candidates = [Path(root)] if root else []
    if not root and os.environ.get(FASHION_MNIST_ENV):
        candidates.append(Path(os.environ[FASHION_MNIST_ENV]))
    if not candidates:
        candidates.append(FASHION_MNIST_DEFAULT)
    for folder in candidates:
        if _idx_path(folder, FASHION_MNIST_FILES["train"][0]) is not None:
            return folder
    raise FileNotFoundError(
        f"Fashion-MNIST not found in {', '.join(map(str, candidates))}. Install it with "
        "'apt-get install dataset-fashion-mnist' (Debian/Ubuntu), or point --data or "
        f"${FASHION_MNIST_ENV} at a folder with the four IDX files (train-images-idx3-ubyte[.gz], ...)"
    )


def _idx_path(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


class FashionMNIST(Dataset):
    """Fashion-MNIST as normalised float tensors (1, 28, 28) and int labels.

    ``augment``: a random shift of up to ``shift`` pixels (zero padding) and a horizontal flip with
    probability ``hflip``, drawn from a generator seeded by (seed, epoch, index), so a sample's
    augmentation does not depend on workers, batch order or a resumed run (call ``set_epoch``).
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "train",
        *,
        augment: bool = False,
        hflip: float = 0.5,
        shift: int = 0,
        seed: int = 0,
        mean: tuple[float, ...] = (0.2860,),
        std: tuple[float, ...] = (0.3530,),
    ):
        if split not in FASHION_MNIST_FILES:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        folder = fashion_mnist_root(root)
        paths = [_idx_path(folder, stem) for stem in FASHION_MNIST_FILES[split]]
        missing = [stem for stem, path in zip(FASHION_MNIST_FILES[split], paths, strict=True) if path is None]
        if missing:
            raise FileNotFoundError(f"{folder} lacks {missing}")
        images, labels = read_idx(paths[0]), read_idx(paths[1])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{folder}: images {images.shape} and labels {labels.shape} do not match")
        self.images = torch.from_numpy(images.copy()).unsqueeze(1)  # (n, 1, 28, 28) uint8
        self.targets = torch.from_numpy(labels.astype(np.int64))
        self.augment, self.hflip, self.shift, self.seed, self.epoch = augment, hflip, shift, seed, 0
        self.mean, self.std = float(mean[0]), float(std[0])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = self.images[index].float() / 255
        if self.augment:
            image = self._augment(image, index)
        return (image - self.mean) / self.std, int(self.targets[index])

    def _augment(self, image: torch.Tensor, index: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) % 2**63)
        if self.shift:
            s = self.shift
            dy, dx = torch.randint(0, 2 * s + 1, (2,), generator=generator).tolist()
            image = F.pad(image, (s, s, s, s))[:, dy : dy + 28, dx : dx + 28]
        if torch.rand((), generator=generator) < self.hflip:
            image = image.flip(-1)
        return image


class ImageFolderSkippingCorrupt(Dataset):
    """torchvision's ImageFolder, except that an unreadable image is logged with its path and
    dropped from the batch (``collate_skipping_none``) instead of stopping the run."""

    def __init__(self, root: str | Path, transform=None):
        from torchvision.datasets import ImageFolder

        self.folder = ImageFolder(str(root))
        self.transform = transform
        self.skipped: list[str] = []

    @property
    def classes(self) -> list[str]:
        return self.folder.classes

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int):
        path, target = self.folder.samples[index]
        try:
            image = self.folder.loader(path)
        except Exception as error:  # PIL raises several types for corrupt files
            log.warning("skipping unreadable image %s: %s", path, error)
            self.skipped.append(path)
            return None
        return (self.transform(image) if self.transform else image), target


def collate_skipping_none(batch: list):
    """default_collate over the samples that loaded; None marks a skipped (corrupt) image."""
    from torch.utils.data import default_collate

    kept = [sample for sample in batch if sample is not None]
    if not kept:
        return None
    return default_collate(kept)
