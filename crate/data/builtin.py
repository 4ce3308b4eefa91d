"""The built-in datasets, held in memory: Fashion-MNIST from its IDX files and scikit-learn's digits.

Fashion-MNIST is read from the files that the Debian package dataset-fashion-mnist installs
(/usr/share/datasets/fashion-mnist); the option ``--data`` or the environment variable
CRATE_FASHION_MNIST points elsewhere. Nothing is downloaded.
"""

import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import InvalidError, MissingError

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
        raise InvalidError(f"cannot read IDX file {path}: {error}") from error
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise InvalidError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise InvalidError(
            f"{path} is truncated or corrupt: {len(data)} bytes, the header implies {expected}"
        )
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
    raise MissingError(
        f"Fashion-MNIST not found in {', '.join(map(str, candidates))}. Install it with "
        "'apt-get install dataset-fashion-mnist' (Debian/Ubuntu), or point --data or "
        f"${FASHION_MNIST_ENV} at a folder with the four IDX files (train-images-idx3-ubyte[.gz], ...)"
    )


def _idx_path(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


class InMemoryImages(Dataset):
    """Grayscale images held in memory, uint8 (n, 1, H, W), with int labels; items are normalised float
    tensors (1, H, W) and labels.

    ``augment``: a random shift of up to ``shift`` pixels (zero padding) and a horizontal flip with
    probability ``hflip``, drawn from a generator seeded by (seed, epoch, index), so a sample's
    augmentation does not depend on workers, batch order or a resumed run (call ``set_epoch``).
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        classes: tuple[str, ...],
        *,
        augment: bool = False,
        hflip: float = 0.5,
        shift: int = 0,
        seed: int = 0,
        mean: tuple[float, ...] = (0.5,),
        std: tuple[float, ...] = (0.5,),
    ):
        self.images, self.targets, self.classes = images, targets, classes
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
            s, (height, width) = self.shift, image.shape[-2:]
            dy, dx = torch.randint(0, 2 * s + 1, (2,), generator=generator).tolist()
            image = F.pad(image, (s, s, s, s))[:, dy : dy + height, dx : dx + width]
        if torch.rand((), generator=generator) < self.hflip:
            image = image.flip(-1)
        return image


class FashionMNIST(InMemoryImages):
    """Fashion-MNIST (70,000 images 28×28 of 10 clothing classes) from the Debian package's IDX files."""

    def __init__(self, root: str | Path | None = None, split: str = "train", **options):
        if split not in FASHION_MNIST_FILES:
            raise InvalidError(f"split must be 'train' or 'test', got {split!r}")
        folder = fashion_mnist_root(root)
        paths = [_idx_path(folder, stem) for stem in FASHION_MNIST_FILES[split]]
        missing = [stem for stem, path in zip(FASHION_MNIST_FILES[split], paths, strict=True) if path is None]
        if missing:
            raise MissingError(f"{folder} lacks {missing}")
        images, labels = read_idx(paths[0]), read_idx(paths[1])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise InvalidError(f"{folder}: images {images.shape} and labels {labels.shape} do not match")
        images = torch.from_numpy(images.copy()).unsqueeze(1)  # (n, 1, 28, 28) uint8
        super().__init__(images, torch.from_numpy(labels.astype(np.int64)), FASHION_MNIST_CLASSES, **options)


DIGITS_TEST_FRACTION = 0.3  # the fixed held-out split: 30% of each class, chosen with seed 0


class Digits(InMemoryImages):
    """scikit-learn's handwritten digits (1,797 real 8×8 scans, 10 classes, from the UCI repository;
    bundled with the package), upsampled bilinearly to 28×28 so that Fashion-MNIST's models read them.

    The split is fixed: 30% of each class (chosen with seed 0) is the test split, the rest the train
    split. ``labels_per_class`` keeps the first k of each class of the train split in an order drawn
    with ``subset_seed``: the few-label settings of the transfer experiment.
    """

    def __init__(self, split: str = "train", labels_per_class: int = 0, subset_seed: int = 0, **options):
        if split not in ("train", "test"):
            raise InvalidError(f"split must be 'train' or 'test', got {split!r}")
        try:
            from sklearn.datasets import load_digits
        except ImportError as error:
            raise ImportError("the digits dataset needs scikit-learn: pip install scikit-learn") from error
        digits = load_digits()
        images = torch.from_numpy(digits.images).float()[:, None] / 16  # (1797, 1, 8, 8) in [0, 1]
        images = F.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False)
        images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        targets = torch.from_numpy(digits.target.astype(np.int64))
        indices = digits_split(targets, split)
        if labels_per_class:
            indices = _per_class(targets, indices, labels_per_class, subset_seed)
        classes = tuple(str(digit) for digit in range(10))
        super().__init__(images[indices], targets[indices], classes, **options)


def digits_split(targets: torch.Tensor, split: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    chosen = []
    for label in range(10):
        members = (targets == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        test_count = round(DIGITS_TEST_FRACTION * len(members))
        chosen.append(members[:test_count] if split == "test" else members[test_count:])
    return torch.cat(chosen).sort().values


def _per_class(targets: torch.Tensor, indices: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in range(10):
        members = indices[targets[indices] == label]
        if count > len(members):
            raise InvalidError(
                f"labels_per_class={count}, but class {label} has {len(members)} training images"
            )
        chosen.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(chosen).sort().values
