"""timm's RandAugment operations on a batch of images on any device, each image with its own
arguments: the tensor forms of timm.data.auto_augment's PIL operations (Pillow's formulas, its uint8
rounding and its affine sampling), applied by ``--data-pipeline gpu`` to the images whose draw chose
them. Images are float tensors (n, 3, H, W) holding integers in [0, 255], as the PIL images are."""

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

# Pillow's "L" conversion: L = (19595 R + 38470 G + 7471 B + 2^15) >> 16
_LUMA = (19595.0, 38470.0, 7471.0)


def _per_image(values: torch.Tensor) -> torch.Tensor:
    """(n,) -> (n, 1, 1, 1), to broadcast over an image batch."""
    return values.view(-1, 1, 1, 1)


def _blend(degenerate: torch.Tensor, image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Pillow's Image.blend(degenerate, image, factor) for uint8: truncated toward zero, then clipped."""
    return (degenerate + _per_image(factor) * (image - degenerate)).trunc().clamp(0, 255)


def _luma(image: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) -> (n, 1, H, W): Pillow's RGB -> "L" conversion."""
    weights = image.new_tensor(_LUMA).view(1, 3, 1, 1)
    return torch.floor(((image * weights).sum(1, keepdim=True) + 32768.0) / 65536.0)


def auto_contrast(image: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    """ImageOps.autocontrast: each channel stretched from its [min, max] to [0, 255] (lut truncated)."""
    wide = image.double()  # Pillow's lut arithmetic, whose rounding decides where values truncate
    low, high = wide.amin((2, 3), keepdim=True), wide.amax((2, 3), keepdim=True)
    scale = torch.full_like(high, 255.0) / (high - low).clamp(min=1)  # (255.0 / t is 255 × 1/t)
    stretched = (wide * scale + -low * scale).trunc().clamp(0, 255)
    return torch.where(high > low, stretched, wide).to(image.dtype)


def equalize(image: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    """ImageOps.equalize, per channel (torchvision's, which follows Pillow's histogram steps)."""
    return TF.equalize(image.to(torch.uint8)).to(image.dtype)


def invert(image: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    return 255.0 - image


def posterize(image: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    """ImageOps.posterize(bits): the top ``bits`` bits kept (0 bits: black, crate's fix for Pillow 11)."""
    step = _per_image(2.0 ** (8 - args[:, 0].clamp(0, 8)))
    return torch.floor(image / step) * step


def solarize(image: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    """ImageOps.solarize(threshold): values at or above the threshold inverted."""
    return torch.where(image < _per_image(args[:, 0]), image, 255.0 - image)


def solarize_add(image: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    """timm's solarize_add(add, threshold 128): ``add`` added below the threshold, capped at 255."""
    return torch.where(image < 128.0, (image + _per_image(args[:, 0])).clamp(max=255), image)


def color(image: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Color: a blend with the image's grayscale."""
    return _blend(_luma(image).expand_as(image), image, args[:, 0])


def contrast(image: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Contrast: a blend with the grey of the image's rounded mean luma."""
    mean = torch.floor(_luma(image).mean((1, 2, 3), keepdim=True) + 0.5)
    return _blend(mean.expand_as(image), image, args[:, 0])


def brightness(image: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Brightness: a blend with black."""
    return _blend(torch.zeros_like(image), image, args[:, 0])


def sharpness(image: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Sharpness: a blend with ImageFilter.SMOOTH (3×3, centre 5, the rest 1, over 13,
    rounded), whose one-pixel border is the image's own."""
    kernel = image.new_ones(3, 1, 3, 3)
    kernel[:, :, 1, 1] = 5.0
    smooth = torch.floor(F.conv2d(image, kernel / 13.0, groups=3) + 0.5)
    degenerate = image.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return _blend(degenerate, image, args[:, 0])


def _affine(image: torch.Tensor, matrices: torch.Tensor, fill: tuple[float, ...]) -> torch.Tensor:
    """Pillow's Image.transform(AFFINE, (a, b, c, d, e, f), BILINEAR, fillcolor): output pixel centre
    (x, y) samples the input at (a x + b y + c, d x + e y + f), pixel centres at +0.5, edge pixels
    clamped inside the image and ``fill`` outside it; the result truncated. ``matrices``: (n, 2, 3)."""
    n, _, height, width = image.shape
    # pixel coordinates -> align_corners=False's normalised ones: u = 2 x / W - 1
    to_normal = image.new_tensor([[2.0 / width, 0, -1], [0, 2.0 / height, -1], [0, 0, 1]])
    from_normal = image.new_tensor(
        [[width / 2.0, 0, width / 2.0], [0, height / 2.0, height / 2.0], [0, 0, 1]]
    )
    full = torch.cat([matrices, image.new_tensor([0, 0, 1]).expand(n, 1, 3)], dim=1)
    theta = (to_normal @ full @ from_normal)[:, :2]
    grid = F.affine_grid(theta, [n, 3, height, width], align_corners=False)
    sampled = F.grid_sample(image, grid, "bilinear", padding_mode="border", align_corners=False)
    inside = ((grid >= -1) & (grid < 1)).all(-1, keepdim=True).permute(0, 3, 1, 2)
    filled = image.new_tensor(fill).view(1, 3, 1, 1)
    return torch.where(inside, torch.floor(sampled).clamp(0, 255), filled)


def _matrices(a, b, c, d, e, f) -> torch.Tensor:
    """(n,) tensors -> (n, 2, 3) affine matrices."""
    return torch.stack([torch.stack([a, b, c], -1), torch.stack([d, e, f], -1)], 1)


def rotate(image: torch.Tensor, args: torch.Tensor, fill) -> torch.Tensor:
    """Image.rotate(degrees) about the image centre, counter-clockwise (Pillow's matrix)."""
    height, width = image.shape[-2:]
    angle = -torch.deg2rad(args[:, 0].double())
    cos, sin = torch.cos(angle), torch.sin(angle)
    centre_x, centre_y = width / 2.0, height / 2.0
    c = cos * -centre_x + sin * -centre_y + centre_x
    f = -sin * -centre_x + cos * -centre_y + centre_y
    return _affine(image, _matrices(cos, sin, c, -sin, cos, f).to(image.dtype), fill)


def shear_x(image: torch.Tensor, args: torch.Tensor, fill) -> torch.Tensor:
    one, zero, factor = torch.ones_like(args[:, 0]), torch.zeros_like(args[:, 0]), args[:, 0]
    return _affine(image, _matrices(one, factor, zero, zero, one, zero), fill)


def shear_y(image: torch.Tensor, args: torch.Tensor, fill) -> torch.Tensor:
    one, zero, factor = torch.ones_like(args[:, 0]), torch.zeros_like(args[:, 0]), args[:, 0]
    return _affine(image, _matrices(one, zero, zero, factor, one, zero), fill)


def translate_x_rel(image: torch.Tensor, args: torch.Tensor, fill) -> torch.Tensor:
    one, zero = torch.ones_like(args[:, 0]), torch.zeros_like(args[:, 0])
    pixels = args[:, 0] * image.shape[-1]
    return _affine(image, _matrices(one, zero, pixels, zero, one, zero), fill)


def translate_y_rel(image: torch.Tensor, args: torch.Tensor, fill) -> torch.Tensor:
    one, zero = torch.ones_like(args[:, 0]), torch.zeros_like(args[:, 0])
    pixels = args[:, 0] * image.shape[-2]
    return _affine(image, _matrices(one, zero, zero, zero, one, pixels), fill)


# timm's operation names (auto_augment.NAME_TO_OP) -> the tensor form; the "Increasing" variants
# differ from the plain ones only in how a magnitude becomes the argument (timm's LEVEL_TO_ARG)
COLOUR_OPS = {
    "AutoContrast": auto_contrast,
    "Equalize": equalize,
    "Invert": invert,
    "Posterize": posterize,
    "PosterizeIncreasing": posterize,
    "PosterizeOriginal": posterize,
    "Solarize": solarize,
    "SolarizeIncreasing": solarize,
    "SolarizeAdd": solarize_add,
    "Color": color,
    "ColorIncreasing": color,
    "Contrast": contrast,
    "ContrastIncreasing": contrast,
    "Brightness": brightness,
    "BrightnessIncreasing": brightness,
    "Sharpness": sharpness,
    "SharpnessIncreasing": sharpness,
}
GEOMETRIC_OPS = {
    "Rotate": rotate,
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateXRel": translate_x_rel,
    "TranslateYRel": translate_y_rel,
}
OPS = COLOUR_OPS | GEOMETRIC_OPS


def apply(name: str, image: torch.Tensor, args: torch.Tensor, fill: tuple[float, ...]) -> torch.Tensor:
    """timm's operation ``name`` on each image of ``image`` (n, 3, H, W) with its arguments
    ``args`` (n, k); ``fill``: the colour geometric operations leave outside the image."""
    if name in GEOMETRIC_OPS:
        return GEOMETRIC_OPS[name](image, args, fill)
    return COLOUR_OPS[name](image, args)
