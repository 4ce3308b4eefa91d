"""``--data-pipeline gpu``: the training transform of the cpu pipeline (timm's, built by
``train_transform``) split in two. In the loader worker, ``plan`` draws every random choice of that
transform, in its order and from the same RNG calls (crop box, flip, RandAugment's operations and
magnitudes, the erased box), so that under SeededSamples an image gets the very augmentation the cpu
pipeline would give it. In the training process, ``__call__`` decodes the batch on the device
(batched nvjpeg on CUDA) and applies the plans with tensor operations: per-image crop and antialiased
resize, flip, RandAugment batched by operation, normalisation, erasing. A step of the transform that
this pipeline does not reproduce is refused by name when the pipeline is built."""

import logging
import math
import random
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import auto_augment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode

from ..errors import InvalidError
from . import rand_augment
from .encoded import EncodedBatch

log = logging.getLogger(__name__)

INTERPOLATIONS = {InterpolationMode.BILINEAR: "bilinear", InterpolationMode.BICUBIC: "bicubic"}


class UnsupportedAugmentationError(InvalidError):
    """A step of the training transform that --data-pipeline gpu does not reproduce."""


@dataclass(frozen=True)
class Plan:
    """One image's augmentation, drawn in the loader worker."""

    crop: tuple[int, int, int, int]  # top, left, height, width in the decoded image
    flip: bool
    ops: tuple  # per RandAugment layer: (timm op name, its arguments) or None (not applied)
    erase: tuple[int, int, int, int] | None  # top, left, height, width in the output


class DevicePipeline:
    """A timm training transform's crop, flip, RandAugment, normalisation and random erasing, drawn by
    ``plan`` and applied to a decoded batch on a device by ``__call__``."""

    def __init__(self, transform: transforms.Compose):
        self.crop, self.flip, self.rand_augment, self.erasing = None, None, None, None
        self.mean = self.std = None
        for step in transform.transforms:
            self._take(step)
        if self.crop is None or self.mean is None:
            raise UnsupportedAugmentationError(
                "--data-pipeline gpu needs a random-resized crop and a normalisation in the training "
                f"transform; it has {[type(step).__name__ for step in transform.transforms]}"
            )
        self.size = tuple(self.crop.size)
        self.interpolation = INTERPOLATIONS[self.crop.interpolation]

    def _take(self, step) -> None:
        if isinstance(step, RandomResizedCropAndInterpolation):
            if step.interpolation not in INTERPOLATIONS:
                raise _refused(f"the crop's interpolation {step.interpolation}", "bilinear or bicubic")
            self.crop = step
        elif isinstance(step, transforms.RandomHorizontalFlip):
            self.flip = step.p
        elif isinstance(step, auto_augment.RandAugment):
            self.rand_augment = _checked_rand_augment(step)
        elif isinstance(step, (MaybeToTensor, transforms.ToTensor)):
            pass
        elif isinstance(step, transforms.Normalize):
            self.mean, self.std = tuple(map(float, step.mean)), tuple(map(float, step.std))
        elif isinstance(step, RandomErasing):
            if step.mode not in ("", "const") or step.max_count != 1 or step.num_splits > 1:
                raise _refused(
                    f"random erasing in mode {step.mode!r} with up to {step.max_count} boxes",
                    "mode const, one box (the presets' --reprob)",
                )
            self.erasing = step
        else:
            raise _refused(_name(step), "crop, flip, timm's RandAugment, random erasing")

    # -- in the loader worker --------------------------------------------------------------------------
    def plan(self, width: int, height: int) -> Plan:
        """This image's augmentation, from the RNG calls the cpu pipeline's transform makes, in order."""
        image = torch.empty(1, 1, 1).expand(1, height, width)  # what get_params reads: the size
        crop = tuple(self.crop.get_params(image, self.crop.scale, self.crop.ratio))
        flip = self.flip is not None and bool(torch.rand(1) < self.flip)
        ops = self._draw_rand_augment() if self.rand_augment else ()
        return Plan(crop, flip, ops, self._draw_erasing() if self.erasing else None)

    def _draw_rand_augment(self) -> tuple:
        """timm's RandAugment.__call__ and AugmentOp.__call__ without the image."""
        step = self.rand_augment
        chosen = np.random.choice(
            step.ops, step.num_layers, replace=step.choice_weights is None, p=step.choice_weights
        )
        return tuple(_draw_op(op) for op in chosen)

    def _draw_erasing(self) -> tuple[int, int, int, int] | None:
        """timm's RandomErasing._erase (one box) on the output image, without erasing."""
        step, (img_h, img_w) = self.erasing, self.size
        if random.random() > step.probability:
            return None
        area = img_h * img_w
        for _ in range(10):
            target_area = random.uniform(step.min_area, step.max_area) * area
            aspect_ratio = math.exp(random.uniform(*step.log_aspect_ratio))
            h = round(math.sqrt(target_area * aspect_ratio))
            w = round(math.sqrt(target_area / aspect_ratio))
            if w < img_w and h < img_h:
                return random.randint(0, img_h - h), random.randint(0, img_w - w), h, w
        return None

    # -- in the training process -----------------------------------------------------------------------
    def __call__(
        self, batch: EncodedBatch, device: torch.device, skip=lambda index, error: None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (B', 3, S, S) float32, normalised; targets (B',)) on ``device``; ``skip(index,
        error)`` is told of each image whose decoding failed, which is left out."""
        pixels = decode(batch, device, skip)
        kept = [i for i, image in enumerate(pixels) if image is not None]
        plans = [batch.plans[i] for i in kept]
        images = self.resized_crops([pixels[i] for i in kept], plans)
        images = self.flipped(images, plans)
        if self.rand_augment:
            images = self.augmented(images, plans)
        images = self.normalised(images)
        if self.erasing:
            images = self.erased(images, plans)
        return images, batch.targets[kept].to(device, non_blocking=True)

    def resized_crops(self, pixels: list[torch.Tensor], plans: list[Plan]) -> torch.Tensor:
        """Each crop resized to the output size with antialiasing (PIL's resize filters widen with
        the scale, as torch's antialias=True does), rounded to integers as PIL's uint8 output is."""
        crops = []
        for image, plan in zip(pixels, plans, strict=True):
            top, left, height, width = plan.crop
            crop = image[None, :, top : top + height, left : left + width].float()
            crops.append(F.interpolate(crop, self.size, mode=self.interpolation, antialias=True))
        if not crops:
            return torch.empty(0, 3, *self.size, device=pixels[0].device if pixels else None)
        return torch.cat(crops).round_().clamp_(0, 255)  # (B, 3, S, S)

    def flipped(self, images: torch.Tensor, plans: list[Plan]) -> torch.Tensor:
        flips = torch.tensor([plan.flip for plan in plans], device=images.device)
        return torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images)

    def augmented(self, images: torch.Tensor, plans: list[Plan]) -> torch.Tensor:
        """Each RandAugment layer in turn; within a layer, each operation once, on the images that drew
        it, with their arguments."""
        fill = self.rand_augment.ops[0].kwargs["fillcolor"]
        for layer in range(self.rand_augment.num_layers):
            chosen = defaultdict(list)
            for index, plan in enumerate(plans):
                if plan.ops[layer] is not None:
                    chosen[plan.ops[layer][0]].append((index, plan.ops[layer][1]))
            for name, members in chosen.items():
                indices = torch.tensor([index for index, _ in members], device=images.device)
                args = torch.tensor([args or (0.0,) for _, args in members], dtype=images.dtype)
                result = rand_augment.apply(name, images[indices], args.to(images.device), fill)
                images = images.index_copy(0, indices, result)
        return images

    def normalised(self, images: torch.Tensor) -> torch.Tensor:
        mean = images.new_tensor(self.mean).view(1, -1, 1, 1)
        std = images.new_tensor(self.std).view(1, -1, 1, 1)
        return (images / 255.0 - mean) / std

    def erased(self, images: torch.Tensor, plans: list[Plan]) -> torch.Tensor:
        """The drawn boxes set to 0 (timm's "const" mode, after normalisation)."""
        boxes = torch.tensor([plan.erase or (0, 0, 0, 0) for plan in plans], device=images.device).view(
            -1, 4, 1, 1
        )
        rows = torch.arange(self.size[0], device=images.device).view(1, -1, 1)
        columns = torch.arange(self.size[1], device=images.device).view(1, 1, -1)
        top, left, height, width = boxes.unbind(1)
        inside = (rows >= top) & (rows < top + height) & (columns >= left) & (columns < left + width)
        return images.masked_fill(inside[:, None], 0.0)


def decode(batch: EncodedBatch, device: torch.device, skip) -> list[torch.Tensor | None]:
    """Each image's pixels (3, H, W) uint8 on ``device``: the JPEGs decoded there in one batched
    call (one by one when that fails, to find the failing ones: None, told to ``skip``)."""
    pixels = [None if image.encoded else image.data.to(device) for image in batch.images]
    encoded = [i for i, image in enumerate(batch.images) if image.encoded]
    if not encoded:
        return pixels
    data = [batch.images[i].data for i in encoded]
    try:
        decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        decoded = [_decoded_or_none(image, device, skip) for image in (batch.images[i] for i in encoded)]
    for i, image in zip(encoded, decoded, strict=True):
        pixels[i] = image
    return pixels


def _decoded_or_none(image, device: torch.device, skip) -> torch.Tensor | None:
    try:
        return decode_jpeg(image.data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as error:
        skip(image.index, error)
        return None


def _draw_op(op: auto_augment.AugmentOp) -> tuple | None:
    """AugmentOp.__call__'s draws: whether it applies, its magnitude, its arguments (the sign too)."""
    if op.prob < 1.0 and random.random() > op.prob:
        return None
    magnitude = op.magnitude
    if op.magnitude_std > 0:
        if op.magnitude_std == float("inf"):
            magnitude = random.uniform(0, magnitude)
        else:
            magnitude = random.gauss(magnitude, op.magnitude_std)
    magnitude = max(0.0, min(magnitude, op.magnitude_max or auto_augment._LEVEL_DENOM))
    args = op.level_fn(magnitude, op.hparams) if op.level_fn is not None else ()
    return op.name, tuple(float(arg) for arg in args)


def _checked_rand_augment(step: auto_augment.RandAugment) -> auto_augment.RandAugment:
    for op in step.ops:
        if op.name not in rand_augment.OPS:
            raise _refused(f"RandAugment's {op.name}", f"the operations {sorted(rand_augment.OPS)}")
        if isinstance(op.kwargs.get("resample"), (tuple, list)):
            raise _refused("RandAugment with a random interpolation", "the model's interpolation")
    return step


def _name(step) -> str:
    """A transform step as the user chose it: its option where it has one."""
    options = {
        "ColorJitter": "colour jitter (--color-jitter)",
        "RandAugment": "torchvision's RandAugment (--auto-augment tv-rand-...)",
        "AutoAugment": "timm's AutoAugment (--auto-augment original/v0/...)",
        "AugMixAugment": "timm's AugMix (--auto-augment augmix-...)",
    }
    return options.get(type(step).__name__, f"{type(step).__name__} ({step})")


def _refused(what: str, supported: str) -> UnsupportedAugmentationError:
    return UnsupportedAugmentationError(
        f"--data-pipeline gpu does not reproduce {what} (it reproduces {supported}): use "
        "--data-pipeline cpu, or leave that option out"
    )
