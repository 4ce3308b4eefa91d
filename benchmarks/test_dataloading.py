"""Data loading: decode + augment images/s of one loader worker on generated ImageNet-size JPEGs, with
the transforms the training recipes use, so the README can say how many loader workers a GPU needs
to keep CRATE fed (its training images/s are in the GPU throughput table).

One worker is one process with one thread: the benchmark runs the dataset's __getitem__ (PIL decode,
then the transform) in this process with torch set to one thread, image after image. Images are
500×375 JPEGs (quality 90, ~100 KB: the size of an average ImageNet training image) of smooth random
shapes plus noise, so that decoding costs what it costs on photographs; they are generated, never
downloaded. `python -m benchmarks.report RESULTS.json` prints the table.
"""

import statistics
import time

import numpy as np
import pytest
import timm
import timm.data
import torch
from PIL import Image, ImageDraw, ImageFilter

from crate import train
from crate.data import ImageFolderSkippingCorrupt
from crate.train.setup import transforms

# recipe: the crate train preset whose transforms are timed (its model's data config: 224², ImageNet
# statistics); "evaluation" is the presets' evaluation transform (resize 256, centre crop 224)
RECIPES = {
    "paper (random-resized crop + flip)": ("paper", True),
    "deit (+ RandAugment m9, random erasing 0.25)": ("deit", True),
    "alpha-finetune (+ RandAugment m9 n2)": ("alpha-finetune", True),
    "transfer (+ torchvision RandAugment n2 m14)": ("transfer", True),
    "evaluation (resize 256, centre crop 224)": ("paper", False),
}


def recipe_transform(recipe: str):
    preset, training = RECIPES[recipe]
    config = train.resolve_config(["--preset", preset, "--finetune", ""])
    cfg = timm.get_pretrained_cfg(config.model).to_dict()
    data_config = timm.data.resolve_data_config({}, pretrained_cfg=cfg)
    return transforms(config, data_config)[0 if training else 1]


def generate_jpegs(folder, count: int, seed: int = 0, size=(500, 375)) -> None:
    """``count`` JPEGs in ``folder``/class0/, photograph-like in cost: shapes, blur and noise."""
    generator = torch.Generator().manual_seed(seed)
    target = folder / "class0"
    target.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        colours = torch.randint(0, 256, (8, 3), generator=generator).tolist()
        image = Image.new("RGB", size, tuple(colours[0]))
        draw = ImageDraw.Draw(image)
        corners = torch.rand(len(colours) - 1, 2, generator=generator) * torch.tensor(size)
        for (x, y), colour in zip(corners.tolist(), colours[1:], strict=True):
            draw.ellipse((x, y, x + size[0] / 3, y + size[1] / 3), fill=tuple(colour))
        pixels = torch.from_numpy(np.asarray(image.filter(ImageFilter.GaussianBlur(3))).copy())
        pixels += torch.randint(0, 40, pixels.shape, dtype=torch.uint8, generator=generator)
        Image.fromarray(pixels.numpy()).save(target / f"{index:04d}.jpg", quality=90)


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory, bench):
    folder = tmp_path_factory.mktemp("jpegs")
    generate_jpegs(folder, 4 if bench.smoke else 48)
    return folder


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_loader_worker_images_per_second(benchmark, bench, jpeg_folder, recipe):
    dataset = ImageFolderSkippingCorrupt(jpeg_folder, recipe_transform(recipe))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a loader worker's
    rates = []

    def one_round():
        start = time.perf_counter()
        for index in range(len(dataset)):
            image, _ = dataset[index]
        rates.append(len(dataset) / (time.perf_counter() - start))
        assert image.shape == (3, 224, 224)

    try:
        benchmark.pedantic(one_round, rounds=bench.rounds, warmup_rounds=1)
    finally:
        torch.set_num_threads(threads)
    kilobytes = statistics.mean(path.stat().st_size for path in (jpeg_folder / "class0").iterdir()) / 1024
    benchmark.extra_info.update(
        recipe=recipe,
        images=len(dataset),
        jpeg_kib=kilobytes,
        images_per_s_per_worker=dict(median=statistics.median(rates), min=min(rates), max=max(rates)),
    )
