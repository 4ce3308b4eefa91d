"""Train CRATE, CRATE-α (or any timm model) on ImageNet or on the built-in Fashion-MNIST.

    crate train --preset fashion-mnist                                   # the CPU demo (make demo)
    crate train --preset fashion-mnist --model crate_alpha_mini_patch4_28   # the same, CRATE-α
    crate train --preset paper --data /data/imagenet                     # one GPU, the paper's recipe
    crate train --preset alpha-finetune --data /data/imagenet            # CRATE-α-B/16: IN-21K -> IN-1K
    torchrun --standalone --nproc_per_node=8 -m crate.train --preset paper --data /data/imagenet
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        -m crate.train --preset paper --data /data/imagenet              # two nodes, run on each

Every preset value can be overridden (``--lr 1e-3``, ``--model crate_small_patch16_224``); the resolved
configuration is saved as config.json in the run folder. ``--resume`` continues a run exactly from its
latest checkpoint. Batch sizes are global; the learning rate is given at ``lr_batch`` and scaled
linearly to the global batch. The class count comes from the dataset (Fashion-MNIST: 10; ImageNet:
the class folders of train/). ``--pretrained`` starts from timm's weights for the model name (a tag
picks them: ``crate_alpha_base_patch16_224.in21k``) or from ``--pretrained-file PATH`` (any
checkpoint this project or the releases wrote; nothing is downloaded then); a classifier of another
class count is dropped and a new one initialised.
"""

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import timm.data
import timm.optim
import timm.scheduler
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from . import analysis, checkpoint
from .data import FashionMNIST, ImageFolderSkippingCorrupt, collate_skipping_none
from .model import CRATE, convert_official_state_dict

log = logging.getLogger("crate.train")


@dataclass
class TrainConfig:
    preset: str = "fashion-mnist"
    model: str = "crate_mini_patch4_28"  # any timm model name (crate_*, crate_alpha_*: `import crate`)
    pretrained: bool = False  # start from the model's published weights (timm; a tag picks them)
    pretrained_file: str | None = None  # ... or from this checkpoint (.pth/.safetensors), with --pretrained
    dataset: str = "fashion-mnist"  # "fashion-mnist" or "imagenet" (a folder with train/ and val/)
    data: str | None = None  # dataset folder (fashion-mnist: default from crate.data)
    output: str = "runs/fashion-mnist"  # run folder: config.json, metrics.jsonl, checkpoints
    epochs: int = 12
    batch_size: int = 128  # global
    lr: float = 2e-3  # at lr_batch; scaled linearly to batch_size
    lr_batch: int = 128
    min_lr: float = 1e-5
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    opt: str = "adamw"  # timm optimizer name: adamw, lion, ...
    opt_betas: str | None = None  # "beta1,beta2", e.g. "0.9,0.95" (None or "": the optimizer's default)
    label_smoothing: float = 0.1
    mixup: float = 0.0  # Mixup alpha (0: off)
    cutmix: float = 0.0  # CutMix alpha (0: off)
    auto_augment: str | None = None  # timm policy string, e.g. "rand-m9-mstd0.5-inc1" (ImageNet only)
    reprob: float = 0.0  # random erasing probability (ImageNet only)
    hflip: float = 0.5
    random_shift: int = 0  # Fashion-MNIST: random translation by up to this many pixels
    ema_decay: float = 0.0  # model EMA decay (0: off)
    drop_path: float = 0.0
    grad_clip: float = 0.0  # max gradient norm (0: off)
    accum_steps: int = 1  # gradient accumulation: micro-batches per optimizer step
    amp: bool = True  # bf16 autocast on GPU, and on CPUs with native bf16 (avx512_bf16 / amx_bf16)
    compile: bool = False
    grad_checkpointing: bool = False
    workers: int = 0
    seed: int = 0
    checkpoint_every: int = 500  # optimizer steps between checkpoints (and one at each epoch end)
    keep_checkpoints: int = 2
    telemetry_batch: int = 64  # fixed evaluation images for the per-layer white-box telemetry
    train_subset: int = 0  # use only the first n training images (0: all)
    eval_subset: int = 0
    max_steps: int = 0  # stop after this many optimizer steps (0: run all epochs)
    resume: bool = False
    log_every: int = 20


PRESETS = {
    "fashion-mnist": {},
    "paper": dict(  # the published ImageNet-1K recipe (official-architecture.md)
        model="crate_base_patch16_224",
        dataset="imagenet",
        output="runs/imagenet-paper",
        epochs=150,
        batch_size=2048,
        lr=2.4e-4,
        lr_batch=2048,
        min_lr=0.0,
        warmup_epochs=5,
        weight_decay=0.5,
        opt="lion",
        label_smoothing=0.1,
        workers=8,
        checkpoint_every=1000,
    ),
    "deit": dict(  # DeiT's recipe: AdamW, RandAugment, Mixup/CutMix, random erasing, EMA
        model="crate_base_patch16_224",
        dataset="imagenet",
        output="runs/imagenet-deit",
        epochs=300,
        batch_size=1024,
        lr=5e-4 * 1024 / 512,
        lr_batch=1024,
        min_lr=1e-5,
        warmup_epochs=5,
        weight_decay=0.05,
        opt="adamw",
        label_smoothing=0.1,
        mixup=0.8,
        cutmix=1.0,
        auto_augment="rand-m9-mstd0.5-inc1",
        reprob=0.25,
        ema_decay=0.99996,
        drop_path=0.1,
        workers=8,
        checkpoint_every=1000,
    ),
    # CRATE-α (docs/crate-alpha.md §6): the release's JAX configs (UCSC-VLAA/CRATE-alpha,
    # configs/crate/classification/{fine_tuning_in1k,pre_training_in21k}.py), at batch 4096 with the lr
    # given at batch 256. Not reproduced here, in both stages:
    # - the release keeps Adam's first moment in bf16 (optax scale_by_adam(mu_dtype=bfloat16)); here it
    #   is float32;
    # - it decays only the kernels of Dense/Conv layers (names ending "/kernel": qkv, W_out, patch
    #   embedding, head), not the dictionaries D, D₁; timm's rule here decays every parameter of two or
    #   more dimensions but pos_embed and cls_token, so D and D₁ too;
    # - its warm-up rises linearly from 0, timm's from lr·1e-3; its eval resize is "area" (here bilinear);
    # - its RandAugment is its own TF port of timm's (15 ops, no Cutout; apply probability 0.5,
    #   magnitude N(9, 0.5²), increasing ops); here timm's own "rand-m9-n2-mstd0.5-inc1", whose op set
    #   differs slightly; its label smoothing puts 0.9 (not 0.9 + 0.1/1000) on the true class.
    "alpha-finetune": dict(  # ImageNet-1K fine-tuning of the ImageNet-21K pre-trained CRATE-α-B/16
        model="crate_alpha_base_patch16_224.in21k",
        pretrained=True,
        # The release does not load the patch embedding's kernel (dont_load: head/*, embedding/kernel)
        # and trains it anew from its random init; here it is loaded with the rest. The head (19,167
        # classes) is dropped because the class count differs.
        dataset="imagenet",
        output="runs/imagenet-alpha-finetune",
        epochs=91,
        batch_size=4096,
        lr=1e-5,  # at batch 256: 1.6e-4 at 4096
        lr_batch=256,
        min_lr=1e-6,
        warmup_epochs=10,
        weight_decay=0.1,  # decoupled and scaled by the lr, as optax's add_decayed_weights before scale(lr)
        opt="adamw",
        opt_betas="0.9,0.95",
        grad_clip=1.0,
        label_smoothing=0.1,
        mixup=0.8,
        cutmix=1.0,  # timm's Mixup switches between the two with probability 0.5, as the release
        auto_augment="rand-m9-n2-mstd0.5-inc1",  # randaug(2, 9, increase=True, timm=True)
        reprob=0.0,
        drop_path=0.0,
        workers=8,
        checkpoint_every=1000,
    ),
    "alpha-pretrain": dict(  # ImageNet-21K pre-training of CRATE-α-B/16, from scratch
        # --data: ImageNet-21K (19,167 classes in the release) in the ImageFolder layout, with a val/
        # split holding the same class folders. The initialisation is the PyTorch port's (crate/alpha.py:
        # position embedding and cls token standard normal, PyTorch's Linear defaults, D and D₁
        # U(±√(6/4d))), not the JAX training code's (models/crate.py: position embedding N(0, 0.02²), cls
        # token N(0, 1e-6²), qkv, W_out and head N(0, 0.02²) with zero biases, and flax's kaiming_uniform
        # on the (d, 4d) dictionaries, whose fan-in is d: U(±√(6/d)), so η‖D‖₂² ≈ 1.8 at init, not 0.45).
        model="crate_alpha_base_patch16_224",
        pretrained=False,
        dataset="imagenet",
        output="runs/imagenet21k-alpha-pretrain",
        epochs=91,
        batch_size=4096,
        lr=5e-5,  # at batch 256: 8e-4 at 4096
        lr_batch=256,
        min_lr=1e-6,
        warmup_epochs=10,
        weight_decay=0.1,
        opt="adamw",
        opt_betas="0.9,0.95",
        grad_clip=1.0,
        label_smoothing=0.0,
        mixup=0.8,
        cutmix=1.0,
        auto_augment=None,
        reprob=0.0,
        drop_path=0.0,
        workers=8,
        checkpoint_every=1000,
    ),
}


def resolve_config(argv: list[str] | None = None) -> TrainConfig:
    """Preset values, then every command-line override."""
    parser = argparse.ArgumentParser(prog="crate train", description=__doc__.splitlines()[0])
    for field in dataclasses.fields(TrainConfig):
        flag = f"--{field.name.replace('_', '-')}"
        if field.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction)
        else:
            parser.add_argument(flag, type=field.type if field.type in (int, float) else str)
    args = {key: value for key, value in vars(parser.parse_args(argv)).items() if value is not None}
    preset = args.get("preset", TrainConfig.preset)
    if preset not in PRESETS:
        parser.error(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    config = TrainConfig(**(PRESETS[preset] | args))
    try:
        check_config(config)
    except ValueError as error:
        parser.error(str(error))
    return config


def check_config(config: TrainConfig) -> None:
    """Options that cannot work together or cannot be parsed: a ValueError saying what was expected."""
    opt_betas(config)
    if config.pretrained_file and not config.pretrained:
        raise ValueError(
            f"--pretrained-file {config.pretrained_file} is read only with --pretrained: add --pretrained "
            "(or leave out --pretrained-file to train from a random initialisation)"
        )


def opt_betas(config: TrainConfig) -> tuple[float, float] | None:
    """--opt-betas "beta1,beta2" as a tuple, None for the optimizer's default."""
    if config.opt_betas is None or not config.opt_betas.strip():
        return None
    expected = 'two comma-separated numbers in [0, 1), e.g. "0.9,0.95"'
    try:
        betas = tuple(float(value) for value in config.opt_betas.split(","))
    except ValueError:
        raise ValueError(f"--opt-betas must be {expected}, got {config.opt_betas!r}") from None
    if len(betas) != 2 or not all(0 <= beta < 1 for beta in betas):
        raise ValueError(f"--opt-betas must be {expected}, got {config.opt_betas!r}")
    return betas


# -- distributed -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Distributed:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: nccl on GPU, gloo on CPU; else one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        return Distributed(dist.get_rank(), dist.get_world_size(), device)
    return Distributed(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))


# -- data --------------------------------------------------------------------------------------------
def build_datasets(config: TrainConfig, model: torch.nn.Module) -> tuple[Dataset, Dataset]:
    data_config = timm.data.resolve_data_config({}, model=model)
    if config.dataset == "fashion-mnist":
        train = FashionMNIST(
            config.data,
            "train",
            augment=True,
            hflip=config.hflip,
            shift=config.random_shift,
            seed=config.seed,
            mean=data_config["mean"],
            std=data_config["std"],
        )
        test = FashionMNIST(config.data, "test", mean=data_config["mean"], std=data_config["std"])
    elif config.dataset == "imagenet":
        root = _imagenet_root(config)
        train_transform = timm.data.create_transform(
            **data_config,
            is_training=True,
            auto_augment=config.auto_augment,
            re_prob=config.reprob,
            hflip=config.hflip,
        )
        train = ImageFolderSkippingCorrupt(root / "train", train_transform)
        test = ImageFolderSkippingCorrupt(root / "val", timm.data.create_transform(**data_config))
        if test.classes != train.classes:
            only_train = sorted(set(train.classes) - set(test.classes))
            only_val = sorted(set(test.classes) - set(train.classes))
            raise ValueError(
                f"{root / 'val'} and {root / 'train'} must hold the same class folders (the labels are their "
                f"sorted order); only in train/: {only_train[:5]}{' ...' if len(only_train) > 5 else ''}, "
                f"only in val/: {only_val[:5]}{' ...' if len(only_val) > 5 else ''}"
            )
    else:
        raise ValueError(_DATASET_ERROR.format(config.dataset))
    if config.train_subset:
        train = _subset(train, config.train_subset)
    if config.eval_subset:
        test = _subset(test, config.eval_subset)
    return train, test


_DATASET_ERROR = "dataset must be 'fashion-mnist' or 'imagenet', got {!r}"


def _imagenet_root(config: TrainConfig) -> Path:
    root = Path(config.data or "")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FileNotFoundError(
                f"ImageNet not found: {root / split} is not a folder. Pass --data with a folder holding "
                "train/ and val/ in torchvision's ImageFolder layout (one sub-folder per class)"
            )
    return root


def dataset_classes(config: TrainConfig) -> int:
    """The task's class count: 10 for Fashion-MNIST, the class folders of train/ for ImageNet."""
    if config.dataset == "fashion-mnist":
        return 10
    if config.dataset == "imagenet":
        from torchvision.datasets.folder import find_classes

        return len(find_classes(str(_imagenet_root(config) / "train"))[0])
    raise ValueError(_DATASET_ERROR.format(config.dataset))


# -- model -------------------------------------------------------------------------------------------
def build_model(config: TrainConfig, load_weights: bool = True) -> torch.nn.Module:
    """timm.create_model(config.model) with the dataset's class count and the drop-path rate; with
    --pretrained (and ``load_weights``: a resumed run skips them), the model's published weights or
    --pretrained-file (converted from the released layouts by the registry's filter), the classifier
    dropped when its class count differs."""
    check_config(config)
    kwargs = dict(drop_path_rate=config.drop_path, num_classes=dataset_classes(config))
    if config.pretrained and load_weights:
        kwargs["pretrained"] = True
        if config.pretrained_file:
            path = Path(config.pretrained_file)
            if not path.is_file():
                raise FileNotFoundError(
                    f"--pretrained-file {path}: no such file (expected a .pth or .safetensors state dict)"
                )
            # timm drops the classifier when the model's class count differs from the cfg's: the
            # cfg's is the file's here, not the one the model name's default weights have
            kwargs["pretrained_cfg_overlay"] = dict(file=str(path), num_classes=checkpoint_classes(path))
        else:
            cfg = timm.models.get_pretrained_cfg(config.model)
            if cfg is not None and not (cfg.url or cfg.hf_hub_id or cfg.file or cfg.state_dict):
                raise ValueError(
                    f"--pretrained: timm has no published weights for {config.model} (its pretrained cfg "
                    "names no URL, Hub repository or file); pass --pretrained-file PATH with a checkpoint, "
                    "choose a model name with weights (e.g. crate_alpha_base_patch16_224.in21k), or leave "
                    "out --pretrained"
                )
    return timm.create_model(config.model, **kwargs)


def checkpoint_classes(path: Path) -> int:
    """The class count of a checkpoint's classifier (0 when it has none), read without loading it all:
    safetensors headers, or a memory-mapped torch.load."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            state = {
                key: torch.empty(handle.get_slice(key).get_shape(), device="meta") for key in handle.keys()
            }
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    state = convert_official_state_dict(state)
    head = state.get("head.weight")
    return int(head.shape[0]) if head is not None else 0


def _subset(dataset: Dataset, size: int) -> Dataset:
    subset = Subset(dataset, range(min(size, len(dataset))))
    subset.set_epoch = getattr(dataset, "set_epoch", lambda epoch: None)
    return subset


class ResumableSampler(torch.utils.data.Sampler):
    """The distributed sampler's epoch permutation (seeded by seed and epoch), starting at a given
    batch, so that a resumed run sees exactly the batches the interrupted one had not seen."""

    def __init__(self, dataset: Dataset, distributed: Distributed, seed: int, batch_per_rank: int):
        self.inner = torch.utils.data.DistributedSampler(
            dataset,
            num_replicas=distributed.world_size,
            rank=distributed.rank,
            shuffle=True,
            seed=seed,
            drop_last=True,
        )
        self.batch_per_rank, self.start_batch = batch_per_rank, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.start_batch = start_batch

    def __iter__(self):
        indices = list(self.inner)
        usable = len(indices) // self.batch_per_rank * self.batch_per_rank
        return iter(indices[self.start_batch * self.batch_per_rank : usable])

    def __len__(self) -> int:
        return (len(self.inner) // self.batch_per_rank - self.start_batch) * self.batch_per_rank


# -- evaluation --------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, loader, device, autocast) -> dict:
    model.eval()
    correct1 = correct5 = total = 0
    loss = 0.0
    for batch in loader:
        if batch is None:
            continue
        images, targets = batch[0].to(device), batch[1].to(device)
        with autocast():
            logits = model(images).float()
        loss += F.cross_entropy(logits, targets, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == targets).sum().item()
        correct5 += (top == targets[:, None]).any(1).sum().item()
        total += len(targets)
    counts = torch.tensor([correct1, correct5, total, loss], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(counts)
    correct1, correct5, total, loss = counts.tolist()
    return dict(
        top1=100 * correct1 / total,
        top5=100 * correct5 / total,
        eval_loss=loss / total,
        eval_images=int(total),
    )


# -- training ----------------------------------------------------------------------------------------
def train(config: TrainConfig) -> dict:
    """Run (or resume) training; returns the final evaluation metrics. Rank 0 writes everything."""
    distributed = setup_distributed()
    device = distributed.device
    output = Path(config.output)
    if distributed.is_main:
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    _seed_everything(config.seed)  # the same initial model (and EMA) on every rank

    model = build_model(config, load_weights=not config.resume)  # resuming restores every weight
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)
    train_set, test_set = build_datasets(config, model)
    if config.batch_size % (distributed.world_size * config.accum_steps):
        raise ValueError(
            f"batch_size {config.batch_size} must be divisible by world size × accum_steps "
            f"({distributed.world_size} × {config.accum_steps})"
        )
    micro_batch = config.batch_size // (distributed.world_size * config.accum_steps)
    sampler = ResumableSampler(train_set, distributed, config.seed, micro_batch * config.accum_steps)
    loader = DataLoader(
        train_set,
        micro_batch,
        sampler=sampler,
        num_workers=config.workers,
        collate_fn=collate_skipping_none,
        drop_last=True,
        persistent_workers=False,
    )
    test_loader = DataLoader(
        test_set,
        256,
        sampler=torch.utils.data.DistributedSampler(test_set, shuffle=False)
        if dist.is_initialized()
        else None,
        num_workers=config.workers,
        collate_fn=collate_skipping_none,
    )
    steps_per_epoch = len(sampler) // (micro_batch * config.accum_steps)
    if steps_per_epoch == 0:
        raise ValueError(f"the training set ({len(train_set)} images) is smaller than one global batch")

    lr = config.lr * config.batch_size / config.lr_batch
    betas = opt_betas(config)
    optimizer = timm.optim.create_optimizer_v2(
        model, config.opt, lr=lr, weight_decay=config.weight_decay, **({"betas": betas} if betas else {})
    )
    if betas is not None and "betas" not in optimizer.param_groups[0]:  # timm drops unknown arguments
        raise ValueError(
            f"--opt-betas {config.opt_betas}: optimizer {config.opt!r} ({type(optimizer).__name__}) takes no "
            "betas; leave out --opt-betas or choose an optimizer with betas (adamw, adam, lion, ...)"
        )
    scheduler, _ = timm.scheduler.create_scheduler_v2(
        optimizer,
        "cosine",
        num_epochs=config.epochs,
        warmup_epochs=config.warmup_epochs,
        min_lr=config.min_lr,
        warmup_lr=lr * 1e-3,
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    ema = ModelEmaV3(model, decay=config.ema_decay) if config.ema_decay > 0 else None
    mixup = (
        Mixup(
            mixup_alpha=config.mixup,
            cutmix_alpha=config.cutmix,
            label_smoothing=config.label_smoothing,
            num_classes=model.num_classes,
        )
        if config.mixup or config.cutmix
        else None
    )
    criterion = (
        SoftTargetCrossEntropy()
        if mixup
        else torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    )

    _seed_everything(config.seed + distributed.rank)  # then per-rank streams for dropout, drop-path, Mixup
    step = 0
    if config.resume:
        step = checkpoint.restore(output, model, optimizer, ema, device)
        log.info("resumed from step %d", step)
    train_model = torch.compile(model) if config.compile else model
    if dist.is_initialized():
        train_model = DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    autocast = _autocast(config, device)
    telemetry_images = torch.stack(
        [test_set[i][0] for i in range(min(config.telemetry_batch, len(test_set)))]
    )
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)

    metrics_file = (output / "metrics.jsonl").open("a") if distributed.is_main else None
    interactive = sys.stderr.isatty()  # a log file gets a line every 30 s, not every step
    progress = tqdm(
        mininterval=0.1 if interactive else 30,
        total=total_steps,
        initial=step,
        disable=not distributed.is_main,
        unit="step",
        dynamic_ncols=True,
    )
    result = {}
    start_time = time.perf_counter()
    skipped_images = 0
    while step < total_steps:
        epoch, batch_in_epoch = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch, batch_in_epoch)
        getattr(train_set, "set_epoch", lambda e: None)(epoch)
        model.train()
        tick, images_seen = time.perf_counter(), 0
        for micro_step, batch in enumerate(loader):
            if batch is None:  # every image of the micro-batch was unreadable
                skipped_images += micro_batch
                continue
            skipped_images += micro_batch - len(batch[1])
            images, targets = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            if mixup:
                images, targets = mixup(images, targets)
            last_micro = (micro_step + 1) % config.accum_steps == 0
            sync = (
                contextlib.nullcontext() if last_micro or not dist.is_initialized() else train_model.no_sync()
            )
            with sync, autocast():
                loss = criterion(train_model(images), targets) / config.accum_steps
                loss.backward()
            images_seen += len(images) * distributed.world_size
            if not last_micro:
                continue
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            scheduler.step_update(step)
            if ema is not None:
                ema.update(model, step=step)
            progress.update(1)
            if step % config.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - tick
                record = dict(
                    step=step,
                    epoch=step / steps_per_epoch,
                    loss=loss.item() * config.accum_steps,
                    lr=optimizer.param_groups[0]["lr"],
                    images_per_s=images_seen / elapsed,
                )
                progress.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['images_per_s']:.0f}")
                _write(metrics_file, record)
                tick, images_seen = time.perf_counter(), 0
            end_of_epoch = step % steps_per_epoch == 0
            if distributed.is_main and (
                step % config.checkpoint_every == 0 or end_of_epoch or step == total_steps
            ):
                checkpoint.save(output, step, model, optimizer, ema, config.keep_checkpoints)
            if end_of_epoch or step == total_steps:
                if skipped_images:
                    log.warning(
                        "%d unreadable training images skipped so far (paths logged above)", skipped_images
                    )
                result = _evaluate_and_report(
                    model,
                    ema,
                    test_loader,
                    telemetry_images,
                    device,
                    autocast,
                    step,
                    steps_per_epoch,
                    metrics_file,
                    start_time,
                )
                progress.write(_summary(result))
            if step == total_steps:
                break
    progress.close()
    if metrics_file:
        metrics_file.close()
    if dist.is_initialized():
        dist.barrier()
    return result


def _evaluate_and_report(
    model, ema, loader, telemetry_images, device, autocast, step, steps_per_epoch, metrics_file, start_time
) -> dict:
    evaluated = ema.module if ema is not None else model
    result = dict(step=step, epoch=step / steps_per_epoch, **evaluate(evaluated, loader, device, autocast))
    result["train_time_s"] = time.perf_counter() - start_time
    if isinstance(evaluated, CRATE):  # CRATE and CRATE-α (a subclass): crate.analysis.audit's fields
        result["whitebox_images"] = len(telemetry_images)
        result["whitebox"] = analysis.audit(evaluated, telemetry_images.to(device))
    _write(metrics_file, result)
    return result


def _summary(result: dict) -> str:
    return (
        f"epoch {result['epoch']:.2f}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
        f"eval loss {result['eval_loss']:.4f}  ({result['train_time_s']:.0f} s)"
    )


def _autocast(config: TrainConfig, device: torch.device):
    enabled = config.amp and (device.type == "cuda" or _cpu_has_native_bf16())
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _cpu_has_native_bf16() -> bool:
    """bf16 autocast pays off on CPUs with bf16 instructions (1.7× for the demo model); elsewhere it
    is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _write(handle, record: dict) -> None:
    if handle is not None:
        handle.write(json.dumps(record) + "\n")
        handle.flush()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = resolve_config(argv)
    result = train(config)
    if result and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "whitebox"}))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
