"""Data loading: decode + augment images/s of one loader worker on generated ImageNet-size JPEGs, with
the transforms the training recipes use, so the README can say how many loader workers a GPU needs
to keep CRATE fed (its training images/s are in the GPU throughput table).

One worker is one process with one thread: the benchmark runs the dataset's __getitem__ (PIL decode,
then the transform) in this process with torch set to one thread, image after image. Images are
500×375 JPEGs (quality 90, ~100 KB: the size of an average ImageNet training image) of smooth random
shapes plus noise, so that decoding costs what it costs on photographs; they are generated, never
downloaded. `python -m benchmarks.report RESULTS.json` prints the table.
"""

import os
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import timm.data
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import DataLoader
from torchvision.ops import roi_align
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from benchmarks.imagenet_folder import make_folder
from crate import data, train
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


# -- --data-pipeline gpu -----------------------------------------------------------------------------------
# On an ImageNet-shaped folder (benchmarks/imagenet_folder.py: ~400×350 JPEGs of quality 75–95): what
# one CPU core does per image in each pipeline's loader worker and, for the gpu pipeline, what the
# training process does per image on its device (device="cpu" here: the same code, decode_jpeg's CPU
# path). Then, on CUDA only, the gpu pipeline's batched decode + augment on the GPU, and CRATE-B's
# training images/s end to end on the folder, each batch prepared between the steps or one step ahead
# (prefetched), against synthetic input (the goal: >= 90%).
PIPELINE_RECIPES = {"paper": "paper (crop + flip)", "deit": "deit (+ RandAugment m9, erasing 0.25)"}


@pytest.fixture(scope="module")
def imagenet_folder(tmp_path_factory, bench):
    images = 8 if bench.smoke else (3072 if bench.device.type == "cuda" else 96)
    return make_folder(tmp_path_factory.mktemp("imagenet-shaped"), images)


def pipeline_datasets(folder, preset: str, sample_limit: int = 0):
    """(the cpu pipeline's dataset, the gpu pipeline's) over ``folder`` with ``preset``'s 224² transform,
    each draw seeded per sample as in training."""
    transform = recipe_transform(next(r for r in RECIPES if r.startswith(preset)))
    cpu = ImageFolderSkippingCorrupt(folder, transform)
    files = ImageFolderSkippingCorrupt(folder)
    if sample_limit:
        cpu.samples, files.samples = cpu.samples[:sample_limit], files.samples[:sample_limit]
    gpu = data.EncodedImages(files, data.DevicePipeline(transform))
    return data.SeededSamples(cpu, 0), data.SeededSamples(gpu, 0)


def _per_second(count: int, work) -> float:
    start = time.perf_counter()
    work()
    return count / (time.perf_counter() - start)


@pytest.mark.parametrize("preset", list(PIPELINE_RECIPES))
def test_pipelines_images_per_second_per_core(benchmark, bench, imagenet_folder, preset):
    """One thread (one core): the cpu pipeline's worker (decode + augment), the gpu pipeline's worker
    (read bytes, parse the header, draw the augmentation) and its training-process work on device="cpu"
    (decode + augment of the batch)."""
    cpu, gpu = pipeline_datasets(imagenet_folder, preset, 8 if bench.smoke else 96)
    count = len(cpu)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rates = {"cpu_worker": [], "gpu_worker": [], "gpu_on_cpu": []}

    def one_round():
        rates["cpu_worker"].append(_per_second(count, lambda: [cpu[i] for i in range(count)]))
        items = []
        rates["gpu_worker"].append(_per_second(count, lambda: items.extend(gpu[i] for i in range(count))))
        batch = data.collate_encoded(items)
        rates["gpu_on_cpu"].append(_per_second(count, lambda: gpu.dataset.inputs(batch, torch.device("cpu"))))

    try:
        benchmark.pedantic(one_round, rounds=bench.rounds, warmup_rounds=0 if bench.smoke else 1)
    finally:
        torch.set_num_threads(threads)
    sizes = [Image.open(path).size for path, _ in cpu.dataset.samples]
    benchmark.extra_info.update(
        pipeline_recipe=PIPELINE_RECIPES[preset],
        images=count,
        mean_size=[statistics.mean(s[0] for s in sizes), statistics.mean(s[1] for s in sizes)],
        jpeg_kib=statistics.mean(Path(p).stat().st_size for p, _ in cpu.dataset.samples) / 1024,
        per_core={name: _spread(values) for name, values in rates.items()},
    )


def _spread(values: list[float]) -> dict[str, float]:
    return dict(median=statistics.median(values), min=min(values), max=max(values))


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU's decode needs CUDA")


@cuda_only
@pytest.mark.parametrize("preset", list(PIPELINE_RECIPES))
def test_gpu_pipeline_decode_and_augment_on_the_gpu(benchmark, bench, imagenet_folder, preset):
    """The training process's share on CUDA: a batch of encoded JPEGs (batch 256) decoded by nvjpeg and
    augmented, synchronised; images/s (the workers' share is the row above)."""
    _, gpu = pipeline_datasets(imagenet_folder, preset)
    batch = data.collate_encoded([gpu[i] for i in range(bench.batch)])
    device = torch.device("cuda")
    rates = []

    def one_round():
        torch.cuda.synchronize()
        start = time.perf_counter()
        images, _ = gpu.dataset.inputs(batch, device)
        torch.cuda.synchronize()
        rates.append(len(images) / (time.perf_counter() - start))

    benchmark.pedantic(one_round, rounds=bench.rounds, warmup_rounds=2)
    benchmark.extra_info.update(
        pipeline_recipe=PIPELINE_RECIPES[preset],
        device=torch.cuda.get_device_name(),
        batch=bench.batch,
        gpu_images_per_s=_spread(rates),
    )


@pytest.mark.parametrize("preset", list(PIPELINE_RECIPES))
def test_end_to_end_training_on_a_jpeg_folder(benchmark, bench, imagenet_folder, preset):
    """CRATE-B (bf16 autocast, batch 256, AdamW) trained from the folder through the gpu pipeline,
    loader workers on every core, each batch decoded and augmented either between the steps
    ("synchronous") or in a thread on a side CUDA stream while the step before runs ("prefetched", what
    training does on CUDA: crate/data/prefetch.py), against the same steps on synthetic input already
    on the GPU: images/s of each and each folder row's ratio to synthetic (goal: >= 0.9). On the CPU
    only in smoke mode (CRATE-T of one layer, batch 2, one worker, one step), so that the code runs in
    `make test`."""
    if bench.device.type != "cuda" and not bench.smoke:
        pytest.skip("end to end on the GPU (CPU: smoke mode only)")
    device, workers = bench.device, 1 if bench.smoke else len(os.sched_getaffinity(0))
    model_name = "crate_base_patch16_224" if device.type == "cuda" else "crate_tiny_patch16_224"
    depth = dict(depth=1) if bench.smoke else {}
    model = timm.create_model(model_name, num_classes=1000, **depth).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bench.amp)
    _, gpu = pipeline_datasets(imagenet_folder, preset)
    loader = DataLoader(
        gpu, bench.batch, shuffle=True, num_workers=workers, collate_fn=data.collate_encoded,
        drop_last=True, persistent_workers=True, prefetch_factor=4,
    )  # fmt: skip
    # three inputs now, two before: 13 timed steps each (20 before) keep a round's 45 steps (44)
    warmup, steps = (1, 1) if bench.smoke else (2, 13)

    def step(images, targets):
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(model(images), targets)
        loss.backward()
        optimizer.step()

    def batches():
        while True:
            yield from loader

    def prepare(batch):
        return gpu.dataset.inputs(batch, device)

    source = batches()
    fixed = prepare(next(source))  # the synthetic input: one batch, kept on the device
    prefetching = data.prefetched(source, prepare, device)  # draws from the same source, when asked
    inputs = {
        "synchronous": lambda: prepare(next(source)),
        "prefetched": lambda: next(prefetching),
        "synthetic": lambda: fixed,
    }
    rates = {name: [] for name in inputs}

    def timed(make_inputs) -> float:
        for _ in range(warmup):  # workers started, kernels chosen, the prefetched batch in hand taken
            step(*make_inputs())
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step(*make_inputs())
        if device.type == "cuda":
            torch.cuda.synchronize()
        return steps * bench.batch / (time.perf_counter() - start)

    def one_round():
        for name, make_inputs in inputs.items():
            rates[name].append(timed(make_inputs))

    try:
        benchmark.pedantic(one_round, rounds=1 if bench.smoke else 3, warmup_rounds=0)
    finally:
        prefetching.close()  # its thread ends here
    ratios = {
        name: [rate / synthetic for rate, synthetic in zip(rates[name], rates["synthetic"], strict=True)]
        for name in ("synchronous", "prefetched")
    }
    benchmark.extra_info.update(
        pipeline_recipe=PIPELINE_RECIPES[preset],
        end_to_end_model=model_name,
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        batch=bench.batch,
        loader_workers=workers,
        end_to_end_images_per_s={name: _spread(values) for name, values in rates.items()},
        over_synthetic={name: _spread(values) for name, values in ratios.items()},
        goal_met={name: statistics.median(values) >= 0.9 for name, values in ratios.items()},
    )


def _crop_forms():
    """name -> (batch of (3, H, W) uint8 images, crop boxes (top, left, h, w)) -> (B, 3, 224, 224)."""

    def per_image(images, boxes):
        crops = [
            F.interpolate(
                image[None, :, i : i + h, j : j + w].float(), (224, 224), mode="bilinear", antialias=True
            )
            for image, (i, j, h, w) in zip(images, boxes, strict=True)
        ]
        return torch.cat(crops).round().clamp(0, 255)

    def batched_roi_align(images, boxes):
        height, width = max(image.shape[1] for image in images), max(image.shape[2] for image in images)
        padded = images[0].new_zeros(len(images), 3, height, width, dtype=torch.float32)
        for index, image in enumerate(images):
            padded[index, :, : image.shape[1], : image.shape[2]] = image
        rois = torch.tensor([[k, j, i, j + w, i + h] for k, (i, j, h, w) in enumerate(boxes)]).float()
        out = roi_align(padded, rois.to(padded.device), (224, 224), 1.0, sampling_ratio=-1, aligned=True)
        return out.round().clamp(0, 255)

    return {"per image, F.interpolate(antialias=True)": per_image, "batched, roi_align": batched_roi_align}


@pytest.mark.parametrize("form", list(_crop_forms()))
def test_crop_resize_forms(benchmark, bench, imagenet_folder, form):
    """The gpu pipeline's crop + resize, per image (what it does) or batched by roi_align on a padded
    batch: images/s on the bench device (one thread on the CPU) and the difference to PIL's resized
    crop (the cpu pipeline's), in levels."""
    paths = sorted(imagenet_folder.rglob("*.jpg"))[: 4 if bench.smoke else 64]
    pil_images = [Image.open(path).convert("RGB") for path in paths]
    generator = np.random.default_rng(0)
    boxes = []
    for image in pil_images:
        width, height = image.size
        crop_w = int(width * np.sqrt(generator.uniform(0.08, 1)))
        crop_h = min(height, crop_w * height // width)
        boxes.append(
            (
                int(generator.integers(0, height - crop_h + 1)),
                int(generator.integers(0, width - crop_w + 1)),
                crop_h,
                crop_w,
            )
        )
    bilinear = InterpolationMode.BILINEAR
    expected = [
        np.asarray(TF.resized_crop(image, *box, [224, 224], bilinear))
        for image, box in zip(pil_images, boxes, strict=True)
    ]
    expected = torch.from_numpy(np.stack(expected)).permute(0, 3, 1, 2).float()
    images = [
        torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).to(bench.device) for image in pil_images
    ]
    crop = _crop_forms()[form]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rates = []

    def one_round():
        start = time.perf_counter()
        crop(images, boxes)
        if bench.device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(len(images) / (time.perf_counter() - start))

    try:
        benchmark.pedantic(one_round, rounds=bench.rounds, warmup_rounds=1)
    finally:
        torch.set_num_threads(threads)
    difference = (crop(images, boxes).cpu() - expected).abs()
    benchmark.extra_info.update(
        crop_form=form,
        device=str(bench.device),
        crop_images_per_s=_spread(rates),
        levels_to_pil=dict(
            mean=difference.mean().item(),
            above_1=(difference > 1).float().mean().item(),
            max=difference.max().item(),
        ),
    )
