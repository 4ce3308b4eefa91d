"""What a model reads: timm's training and evaluation transforms (with two fixes: torchvision's
RandAugment by name, and posterize to 0 bits on Pillow >= 11), and ``prepare``, which gives a dataset
its transform or, for the in-memory images, the model's normalisation."""

import re
from collections.abc import Iterator

import timm.data
from PIL import Image
from timm.data import auto_augment as auto_augment_module

from ..errors import InvalidError
from .builtin import InMemoryImages


def train_transform(
    data_config: dict,
    auto_augment: str | None = None,
    color_jitter: float = 0.0,
    reprob: float = 0.0,
    hflip: float = 0.5,
):
    """timm's training transform for a model's data config: random-resized crop, flip, the
    ``auto_augment`` policy (timm's, e.g. "rand-m9-mstd0.5-inc1", or torchvision's "tv-rand-n2-m14"),
    colour jitter without a policy, random erasing."""
    torchvision_policy = auto_augment if auto_augment and auto_augment.startswith("tv-rand-") else None
    transform = timm.data.create_transform(
        **data_config,
        is_training=True,
        auto_augment=None if torchvision_policy else auto_augment,
        color_jitter=color_jitter or None,
        re_prob=reprob,
        hflip=hflip,
    )
    if torchvision_policy:
        transform.transforms.insert(
            _to_tensor_position(transform), _torchvision_rand_augment(torchvision_policy)
        )
    for op in _auto_augment_ops(transform):
        if op.aug_fn is auto_augment_module.posterize:
            op.aug_fn = _posterize
    return transform


def eval_transform(data_config: dict, crop_pct: float = 0.0, crop_mode: str = "center"):
    """timm's evaluation transform: resize and crop by ``crop_pct`` (0: the model's) in ``crop_mode``
    ("center", "squash": resize without cropping, or "border")."""
    crop_pct = crop_pct or data_config["crop_pct"]
    return timm.data.create_transform(**(data_config | dict(crop_pct=crop_pct, crop_mode=crop_mode)))


def _auto_augment_ops(transform) -> Iterator:
    """The operations of timm's RandAugment (``ops``) and AutoAugment (``policy``: sub-policies)."""
    for step in transform.transforms:
        yield from getattr(step, "ops", ())
        for sub_policy in getattr(step, "policy", ()):
            yield from sub_policy


def _posterize(image: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, keeping 0 bits as Pillow did before version 11 (a black image), where newer
    Pillow raises: timm's increasing posterize asks for 0 bits at magnitude 10, which "m9-mstd0.5"
    (the deit and alpha presets) samples for about 2% of its posterize operations."""
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return auto_augment_module.posterize(image, bits_to_keep, **kwargs)


def _to_tensor_position(transform) -> int:
    names = [type(step).__name__ for step in transform.transforms]
    return next(i for i, name in enumerate(names) if "ToTensor" in name)


def _torchvision_rand_augment(policy: str):
    """ "tv-rand-n{N}-m{M}": torchvision's RandAugment(num_ops=N, magnitude=M) (magnitudes of 31 bins),
    the official fine-tuning's augmentation (timm's own RandAugment scales magnitudes differently)."""
    from torchvision import transforms

    match = re.fullmatch(r"tv-rand-n(\d+)-m(\d+)", policy)
    if match is None:
        raise InvalidError(
            f'--auto-augment {policy!r}: expected "tv-rand-n<ops>-m<magnitude>", e.g. "tv-rand-n2-m14"'
        )
    return transforms.RandAugment(num_ops=int(match[1]), magnitude=int(match[2]))


class ConvertMode:
    """PIL image -> the model's colour mode ("L" or "RGB"), first in a transform pipeline."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, image):
        return image.convert(self.mode)


def prepare(dataset, transform, mean: tuple[float, ...], std: tuple[float, ...], channels: int) -> None:
    """Make ``dataset`` yield what the model reads: in-memory images are normalised with the model's
    mean and std; image datasets get ``transform``, after a conversion to the model's colour mode."""
    if isinstance(dataset, InMemoryImages):
        if channels != 1:
            raise InvalidError(
                f"{type(dataset).__name__} has 1-channel images; the model reads {channels} channels"
            )
        dataset.mean, dataset.std = float(mean[0]), float(std[0])
        return
    from torchvision import transforms

    dataset.transform = transforms.Compose([ConvertMode("L" if channels == 1 else "RGB"), transform])
