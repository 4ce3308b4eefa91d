"""`crate eval SOURCE --data DATASET`: top-1, top-5, loss and images/s of any model on any dataset.

    crate eval runs/demo-crate_mini_patch7_28 --data fashion-mnist        # a run folder
    crate eval crate_alpha_base_patch16_224 --data /data/imagenet/val     # published weights, a folder
    crate eval crate_base.pth --model crate_base_patch16_224 --data torch/cifar10 --data-root data/cifar10
    crate eval vit_small_patch16_224.augreg_in21k_ft_in1k --data /data/imagenet/val   # a peer, the same way

SOURCE is what crate/weights/sources.py reads: a run or checkpoint folder, a .safetensors or .pth file (this
project's or a released layout; name the architecture with --model), or a timm model name with
published weights. --data is a dataset name (fashion-mnist, digits, torch/cifar10, hfds/..., ...,
torchvision/flowers102) or a folder of images in class sub-folders. The images go through the model's
own evaluation transform (timm's data config: for 224² models resize 256 → centre crop 224, as the
published numbers use), in bf16 autocast where the hardware has it (--no-amp: float32). The result is
printed as JSON and written to --output.
"""

import argparse
import json
import time
from pathlib import Path

import timm.data
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from . import data, errors
from .errors import InvalidError
from .runtime import autocast, default_device, precision_name
from .weights import sources


@torch.no_grad()
def measure(model, loader, device, autocast, progress: bool = False) -> dict:
    """top-1 and top-5 (%), mean cross-entropy, images counted, and images/s of the model's forward
    passes (data loading excluded, per process); counts summed over processes under torch.distributed."""
    model.eval()
    correct1 = correct5 = total = 0
    loss = forward_s = 0.0
    for batch in tqdm(loader, disable=not progress, unit="batch", dynamic_ncols=True):
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


def open_evaluation_split(name: str, root: str | None, split: str, download: bool):
    """The dataset behind --data: a folder of class sub-folders (or one holding ``split``'s), else a
    name crate.data.open_split takes."""
    if Path(name).is_dir():
        return data.open_split("folder", name, split, training=False)
    return data.open_split(name, root, split, training=False, download=download)


def evaluate_source(
    source: str,
    dataset: str,
    *,
    model_name: str | None = None,
    data_root: str | None = None,
    split: str = "validation",
    batch_size: int = 256,
    workers: int = 4,
    amp: bool = True,
    download: bool = False,
    max_images: int = 0,
    progress: bool = True,
    device: str | None = None,
) -> dict:
    """Evaluate ``source`` on ``dataset``; the JSON-ready result."""
    device = torch.device(device) if device else default_device()
    model, name = sources.build_model(sources.read_source(source), model_name)
    model.to(device)
    evaluation = open_evaluation_split(dataset, data_root, split, download)
    classes = data.class_count(evaluation)
    if classes is not None and classes > model.num_classes:
        raise InvalidError(
            f"{dataset} has {classes} classes, but {name} predicts {model.num_classes}: evaluate a model "
            "trained on this dataset's classes (crate train --finetune SOURCE --dataset ... makes one)"
        )
    data_config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**data_config)
    data.prepare(evaluation, transform, data_config["mean"], data_config["std"], data_config["input_size"][0])
    if max_images:
        evaluation = Subset(evaluation, range(min(max_images, len(evaluation))))
    loader = DataLoader(evaluation, batch_size, num_workers=workers, collate_fn=data.collate_skipping_none)
    start = time.perf_counter()
    result = measure(model, loader, device, autocast(device, amp), progress)
    return dict(
        model=name,
        source=str(source),
        dataset=dataset,
        split=split,
        **result,
        wall_s=time.perf_counter() - start,
        precision=precision_name(device, amp),
        device=str(device),
        transform=str(transform).replace("\n", " "),
    )


@errors.command("crate eval")
def main(argv: list[str] | None = None) -> dict:
    parser = errors.Parser(prog="crate eval", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="run folder, checkpoint folder, weights file or timm model name")
    parser.add_argument("--data", required=True, help="dataset name or a folder of class sub-folders")
    parser.add_argument("--data-root", help="where a named dataset lives (default data/<name>)")
    parser.add_argument("--split", default="validation", help="split of a named dataset (default validation)")
    parser.add_argument("--model", help="timm architecture, for weights files without a config.json")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast")
    parser.add_argument("--download", action="store_true", help="fetch a missing named dataset")
    parser.add_argument("--max-images", type=int, default=0, help="evaluate only the first n images")
    parser.add_argument("--output", type=Path, help="JSON file for the result (default: print only)")
    args = parser.parse_args(argv)
    result = evaluate_source(
        args.source,
        args.data,
        model_name=args.model,
        data_root=args.data_root,
        split=args.split,
        batch_size=args.batch_size,
        workers=args.workers,
        amp=args.amp,
        download=args.download,
        max_images=args.max_images,
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
