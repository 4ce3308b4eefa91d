"""`crate eval SOURCE [--dataset NAME --data ROOT]`: top-1, top-5, loss and images/s of a model on a dataset
(of a masked autoencoder, crate_mae_*: its masked-patch reconstruction MSE).

    crate eval runs/demo-crate_mini_patch7_28                             # a run folder, on its own dataset
    crate eval runs/demo-crate_mini_patch7_28 --dataset digits            # ... on another one
    crate eval crate_alpha_base_patch16_224 --data /data/imagenet/val     # published weights, a folder
    crate eval crate_base.pth --model crate_base_patch16_224 --dataset torch/cifar10 --data data/cifar10
    crate eval vit_small_patch16_224.augreg_in21k_ft_in1k --data /data/imagenet/val   # a peer, the same way

SOURCE is what crate/weights/sources.py reads: a run or checkpoint folder, a .safetensors or .pth file (this
project's or a released layout; name the architecture with --model), or a timm model name with
published weights. --dataset and --data are `crate train`'s: the dataset's name (fashion-mnist, digits,
imagenet, folder, torch/cifar10, hfds/..., torchvision/flowers102) and the folder it lives in; a run
(or checkpoint) folder brings its own (its config.json's dataset, data and val_split), and --data FOLDER
alone, without a run, is a folder of images in class sub-folders (--dataset folder). The images go
through the model's own evaluation transform (timm's data config: for 224² models resize 256 → centre
crop 224, as the published numbers use), in bf16 autocast where the hardware has it (--no-amp: float32).
An unreadable image is skipped (never replaced by another), logged with its path and counted in the
result (skipped_images, skipped_paths), which is printed as JSON and written to --output.
"""

import argparse
import json
import os
import time
from pathlib import Path

import timm.data
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import data, errors
from .errors import InvalidError, UserError
from .models.mae import CRATEMAE
from .runtime import autocast, default_device, precision_name, progress_interval
from .weights import sources


@torch.no_grad()
def measure(model, loader, device, autocast, progress: bool = False) -> dict:
    """top-1 and top-5 (%), mean cross-entropy, images counted, and images/s of the model's forward
    passes (data loading excluded, per process); counts summed over processes under torch.distributed."""
    model.eval()
    correct1 = correct5 = total = 0
    loss = forward_s = 0.0
    bar = tqdm(
        loader, disable=not progress, unit="batch", dynamic_ncols=True, mininterval=progress_interval()
    )
    for batch in bar:
        if batch is None:  # every image of the batch was unreadable
            continue
        images, targets = batch[0].to(device), batch[1].to(device)
        start = time.perf_counter()
        with autocast():
            logits = model(images).float()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        forward_s += time.perf_counter() - start
        loss += F.cross_entropy(logits, targets, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == targets).sum().item()
        correct5 += (top == targets[:, None]).any(1).sum().item()
        total += len(targets)
    counts = torch.tensor([correct1, correct5, total, loss], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(counts)
    correct1, correct5, total, loss = counts.tolist()
    if not total:
        raise InvalidError("the evaluation set yielded no images")
    return dict(
        top1=100 * correct1 / total,
        top5=100 * correct5 / total,
        eval_loss=loss / total,
        eval_images=int(total),
        eval_images_per_s=total / forward_s if forward_s else 0.0,
    )


@torch.no_grad()
def measure_reconstruction(model, loader, device, autocast, seed: int = 0, progress: bool = False) -> dict:
    """A masked autoencoder's mean reconstruction MSE on its masked patches (CRATEMAE.forward_loss,
    per pixel of the normalised images) at its mask ratio, images counted, and images/s of the forward
    passes. Each rank draws its images' masking from its own generator seeded by ``seed``: every
    evaluation of a run (and of its resumed sessions) masks the same patches of the same images."""
    model.eval()
    rank = dist.get_rank() if dist.is_initialized() else 0
    generator = torch.Generator().manual_seed(hash((seed, rank)) % 2**63)
    seen = squared_error = forward_s = 0.0
    bar = tqdm(
        loader, disable=not progress, unit="batch", dynamic_ncols=True, mininterval=progress_interval()
    )
    for batch in bar:
        if batch is None:  # every image of the batch was unreadable
            continue
        images = batch[0].to(device)
        noise = torch.rand(len(images), model.num_patches, generator=generator).to(device)
        start = time.perf_counter()
        with autocast():
            batch_loss, _, _ = model(images, noise=noise)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        forward_s += time.perf_counter() - start
        squared_error += batch_loss.item() * len(images)  # every image has the same number of masked patches
        seen += len(images)
    sums = torch.tensor([seen, squared_error], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(sums)
    seen, squared_error = sums.tolist()
    if not seen:
        raise InvalidError("the evaluation set yielded no images")
    return dict(
        eval_loss=squared_error / seen,
        eval_mask_ratio=model.config.mask_ratio,
        eval_images=int(seen),
        eval_images_per_s=seen / forward_s if forward_s else 0.0,
    )


def run_config(source: str | Path) -> dict:
    """The config.json of a run folder, or of the run a checkpoint folder (or its model.safetensors) is
    in; {} for anything else."""
    path = Path(source)
    folders = (
        (path, path.parent) if path.is_dir() else (path.parent, path.parent.parent) if path.is_file() else ()
    )
    for folder in folders:
        if (folder / "config.json").is_file():
            try:
                return json.loads((folder / "config.json").read_text())
            except ValueError as error:
                raise InvalidError(f"{folder / 'config.json'} is not a run's JSON config: {error}") from error
    return {}


def dataset_flags(
    source: str | Path, dataset: str | None, root: str | None, split: str | None
) -> tuple[str, str | None, str]:
    """(dataset, root, split) from --dataset, --data and --split, as `crate train` takes them: each left
    out is the run's own (config.json's dataset, data and val_split) when ``source`` is a run or
    checkpoint folder; without a run, --data FOLDER alone is an image folder (dataset "folder")."""
    if dataset is None and root is not None and not Path(root).exists() and data.is_dataset_name(root):
        raise UserError(
            f"--data {root}: no such folder. --data is the folder a dataset lives in; name the dataset "
            f"with --dataset {root}"
        )
    config = run_config(source)
    dataset = dataset or config.get("dataset") or ("folder" if root is not None else None)
    if dataset is None:
        raise UserError(
            f"{source} is no run folder with a config.json naming its dataset: pass --dataset NAME (and "
            "--data ROOT where it lives), or --data FOLDER of images in class sub-folders"
        )
    runs_own = dataset == config.get("dataset")
    root = root if root is not None else config.get("data") if runs_own else None
    split = split or (config.get("val_split") if runs_own else None) or "validation"
    return dataset, root, split


def evaluation_split(
    model: torch.nn.Module, dataset: str, root: str | None, split: str, download: bool = False
):
    """(split of ``dataset`` as ``model`` reads it, the transform): crate.data.open_split, then the model's
    own evaluation transform (timm's data config) or, for the in-memory images, its normalisation."""
    evaluation = data.open_split(dataset, root, split, training=False, download=download)
    data_config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**data_config)
    data.prepare(evaluation, transform, data_config["mean"], data_config["std"], data_config["input_size"][0])
    return evaluation, transform


def default_workers() -> int:
    """DataLoader workers of `crate eval`: 4, or fewer on a machine with fewer cores."""
    return min(4, os.cpu_count() or 1)


def evaluate_source(
    source: str,
    dataset: str | None = None,
    *,
    model_name: str | None = None,
    data_root: str | None = None,
    split: str | None = None,
    batch_size: int = 256,
    workers: int | None = None,
    amp: bool = True,
    download: bool = False,
    max_images: int = 0,
    seed: int = 0,
    progress: bool = True,
    device: str | None = None,
) -> dict:
    """Evaluate ``source`` on ``dataset`` under ``data_root`` (defaults: ``dataset_flags``), on all of the
    split or ``max_images`` of it drawn with ``seed``; the JSON-ready result."""
    dataset, data_root, split = dataset_flags(source, dataset, data_root, split)
    device = torch.device(device) if device else default_device()
    model, name = sources.build_model(sources.read_source(source), model_name)
    model.to(device)
    evaluation, transform = evaluation_split(model, dataset, data_root, split, download)
    autoencoder = isinstance(model, CRATEMAE)
    classes = data.class_count(evaluation)
    if not autoencoder and classes is not None and classes > model.num_classes:
        raise InvalidError(
            f"{dataset} has {classes} classes, but {name} predicts {model.num_classes}: evaluate a model "
            "trained on this dataset's classes (crate train --finetune SOURCE --dataset ... makes one)"
        )
    chosen = data.sample(evaluation, max_images, seed) if max_images else evaluation
    workers = default_workers() if workers is None else workers
    loader = DataLoader(chosen, batch_size, num_workers=workers, collate_fn=data.collate_skipping_none)
    start = time.perf_counter()
    in_precision = autocast(device, amp)
    if autoencoder:  # its masked-patch reconstruction error, the masking drawn with --seed
        result = measure_reconstruction(model, loader, device, in_precision, seed, progress)
    else:
        result = measure(model, loader, device, in_precision, progress)
    skipped = getattr(evaluation, "skipped", [])
    return dict(
        model=name,
        source=str(source),
        dataset=dataset,
        data=data_root,
        split=split,
        **result,
        skipped_images=len(skipped),
        skipped_paths=skipped[:SKIPPED_PATHS_SHOWN],
        wall_s=time.perf_counter() - start,
        precision=precision_name(device, amp),
        device=str(device),
        transform=str(transform).replace("\n", " "),
    )


SKIPPED_PATHS_SHOWN = 20  # the result names the first unreadable images; the log names every one


def add_dataset_flags(parser: errors.Parser) -> None:
    """--dataset, --data and --split of `crate eval` and `crate audit` (``dataset_flags``)."""
    parser.add_argument(
        "--dataset",
        help="dataset name, as crate train takes it (default: the run's; with --data FOLDER alone: folder)",
    )
    parser.add_argument(
        "--data", help="the folder the dataset lives in (default: the run's; named datasets: data/<name>)"
    )
    parser.add_argument("--split", help="split to read (default: the run's val_split, else validation)")


@errors.command("crate eval")
def main(argv: list[str] | None = None) -> dict:
    parser = errors.Parser(prog="crate eval", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="run folder, checkpoint folder, weights file or timm model name")
    add_dataset_flags(parser)
    parser.add_argument("--model", help="timm architecture, for weights files without a config.json")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=default_workers(), help="DataLoader workers")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast")
    parser.add_argument("--download", action="store_true", help="fetch a missing named dataset")
    parser.add_argument("--max-images", type=int, default=0, help="evaluate n images drawn with --seed")
    parser.add_argument(
        "--seed", type=int, default=0, help="which images --max-images draws, and an autoencoder's masking"
    )
    parser.add_argument("--output", type=Path, help="JSON file for the result (default: print only)")
    args = parser.parse_args(argv)
    result = evaluate_source(
        args.source,
        args.dataset,
        model_name=args.model,
        data_root=args.data,
        split=args.split,
        batch_size=args.batch_size,
        workers=args.workers,
        amp=args.amp,
        download=args.download,
        max_images=args.max_images,
        seed=args.seed,
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
