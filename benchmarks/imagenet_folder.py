"""An ImageNet-shaped JPEG folder, made at benchmark time (never downloaded, never committed): the
ImageFolder layout with a few classes; image sizes drawn like ImageNet's training images (mean about
400 × 350, log-normal spread, clipped to 64–1200 pixels a side); JPEG quality drawn from 75–95; content
of blurred shapes plus noise, so that the files are as large as ImageNet's and decoding costs what it
costs on photographs."""

import multiprocessing
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

MEAN_WIDTH, MEAN_HEIGHT = 400, 350
# the noise's standard deviation (levels): the texture that brings the files to ImageNet's mean size,
# ~110 KB (140 GB over 1.28M training images), where decoding's cost lies (its entropy coding)
NOISE = 35


def image_size(generator: np.random.Generator) -> tuple[int, int]:
    """(width, height): log-normal width around 400 (σ 0.25: most between 300 and 530), aspect ratio
    log-normal around 400/350 (σ 0.2: landscape and portrait, as ImageNet's 500×375 and 375×500)."""
    width = MEAN_WIDTH * np.exp(generator.normal(0, 0.25))
    height = width / (MEAN_WIDTH / MEAN_HEIGHT * np.exp(generator.normal(0, 0.2)))
    return int(np.clip(width, 64, 1200)), int(np.clip(height, 64, 1200))


def natural_image(size: tuple[int, int], generator: np.random.Generator) -> Image.Image:
    colours = generator.integers(0, 256, (8, 3))
    image = Image.new("RGB", size, tuple(int(v) for v in colours[0]))
    draw = ImageDraw.Draw(image)
    for colour in colours[1:]:
        x, y = generator.random(2) * size
        draw.ellipse((x, y, x + size[0] / 3, y + size[1] / 3), fill=tuple(int(v) for v in colour))
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(3))).astype(np.float32)
    pixels += generator.normal(0, NOISE, pixels.shape).astype(np.float32)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def _write(task: tuple[Path, int, int]) -> int:
    path, seed, _ = task
    generator = np.random.default_rng(seed)
    image = natural_image(image_size(generator), generator)
    image.save(path, quality=int(generator.integers(75, 96)))
    return path.stat().st_size


def make_folder(root: Path, images: int, classes: int = 4, seed: int = 0, processes: int = 0) -> Path:
    """``images`` JPEGs in ``root``/<class>/ (``classes`` folders, round robin), in parallel over
    ``processes`` (0: every core); returns ``root``."""
    tasks = []
    for index in range(images):
        folder = root / f"n{index % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        tasks.append((folder / f"{index:06d}.jpg", seed * 1_000_003 + index, index))
    with multiprocessing.get_context("fork").Pool(processes or None) as pool:
        pool.map(_write, tasks, chunksize=16)
    return root
