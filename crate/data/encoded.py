"""What a loader worker does for ``--data-pipeline gpu``: it reads an image file's encoded bytes and
its header (size, format, colour mode), and draws the image's augmentation (``DevicePipeline.plan``);
the training process decodes and augments the batch on its device. JPEGs in RGB or grayscale travel
encoded; any other image (PNG, CMYK JPEG, ...) is decoded here with PIL, as the cpu pipeline decodes
it, and travels as pixels. Unreadable files are skipped by path, as ImageFilesSkippingCorrupt does."""

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.io import read_file

from .datasets import ImageFilesSkippingCorrupt

DEVICE_DECODED_MODES = ("RGB", "L")  # JPEG colour modes decode_jpeg(mode=RGB) converts as PIL does


@dataclass
class EncodedImage:
    data: torch.Tensor  # uint8: the file's bytes (1-D) when ``encoded``, else pixels (3, H, W)
    encoded: bool
    index: int  # in the image files, for skipping it by path when its decoding fails


@dataclass
class EncodedBatch:
    images: list[EncodedImage]
    plans: list  # DevicePipeline.plan's, one per image
    targets: torch.Tensor  # (B,) int64

    def __len__(self) -> int:
        return len(self.images)


class EncodedImages(Dataset):
    """``files``' images as encoded bytes with their augmentation drawn by ``pipeline.plan``; the
    batches (``collate_encoded``) become model inputs on a device with ``inputs``."""

    def __init__(self, files: ImageFilesSkippingCorrupt, pipeline):
        self.files, self.pipeline = files, pipeline

    @property
    def classes(self) -> list[str]:
        return self.files.classes

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path, target = self.files.samples[index]
        try:
            data = read_file(str(path))
            with Image.open(io.BytesIO(data.numpy())) as file:  # the header only: no pixels decoded
                size, jpeg, mode = file.size, file.format == "JPEG", file.mode
                if not (jpeg and mode in DEVICE_DECODED_MODES):
                    pixels = np.asarray(file.convert("RGB"))
                    data = torch.from_numpy(pixels.copy()).permute(2, 0, 1)
        except Exception as error:  # PIL raises several types for corrupt files
            self.files.skip(index, error)
            return None
        image = EncodedImage(data, jpeg and mode in DEVICE_DECODED_MODES, index)
        return image, self.pipeline.plan(*size), target

    def inputs(self, batch: EncodedBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (B', 3, S, S) float32 normalised, targets (B',)) on ``device``: the batch decoded and
        augmented there; B' <= B when some JPEGs fail to decode (skipped by path)."""
        return self.pipeline(batch, device, self.files.skip)


def collate_encoded(batch: list) -> EncodedBatch | None:
    """The samples that loaded, as a list (their sizes differ) of views into one buffer, so that a
    worker sends the batch through one shared-memory file, not one per image; None when none loaded."""
    kept = [sample for sample in batch if sample is not None]
    if not kept:
        return None
    images, plans, targets = zip(*kept, strict=True)
    buffer = torch.cat([image.data.flatten() for image in images])
    ends = torch.tensor([image.data.numel() for image in images]).cumsum(0).tolist()
    views = [
        EncodedImage(buffer[end - size : end].view(image.data.shape), image.encoded, image.index)
        for image, end, size in zip(images, ends, (image.data.numel() for image in images), strict=True)
    ]
    return EncodedBatch(views, list(plans), torch.tensor(targets, dtype=torch.int64))


def encoded_images(dataset: Dataset) -> EncodedImages | None:
    """The EncodedImages under a dataset's wrappers (SeededSamples, a Subset), None when there is none."""
    while not isinstance(dataset, EncodedImages):
        dataset = getattr(dataset, "dataset", None)
        if dataset is None:
            return None
    return dataset
