"""Train or fine-tune CRATE, CRATE-α (or any timm model) on the built-in data, ImageNet or any dataset
timm or torchvision names.

    crate train --preset fashion-mnist                                   # the CPU demo (make demo)
    crate train --preset fashion-mnist --model crate_alpha_mini_patch4_28   # the same, CRATE-α
    crate train --preset paper --data /data/imagenet                     # one GPU, the paper's recipe
    crate train --preset alpha-finetune --data /data/imagenet            # CRATE-α-B/16: IN-21K -> IN-1K
    crate train --preset transfer --finetune crate_base.pth --dataset torch/cifar10 --download
    crate train --finetune runs/demo-crate_mini_patch7_28 --dataset digits --freeze   # a linear probe
    torchrun --standalone --nproc_per_node=8 -m crate.train --preset paper --data /data/imagenet
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        -m crate.train --preset paper --data /data/imagenet              # two nodes, run on each

Every preset value can be overridden (``--lr 1e-3``, ``--model crate_small_patch16_224``); the resolved
configuration is saved as config.json in the run folder. ``--resume`` continues a run exactly from its
latest checkpoint. Batch sizes are global; the learning rate is given at ``lr_batch`` and scaled
linearly to the global batch. The class count comes from the dataset (Fashion-MNIST: 10; ImageNet:
the class folders of train/; named datasets: the classes they declare, else ``--num-classes``).

On a cluster: SIGTERM or SIGUSR1 stops every rank after the same step with a checkpoint (exit code
75); under ``torchrun --max-restarts=N`` a restarted group resumes by itself; a step with a NaN/inf loss
or gradient is skipped on every rank (exit code 65 after --max-nonfinite-steps in a row); a bad
configuration fails before any work in one line (exit code 2). README "Runs that survive a cluster".

``--finetune SOURCE`` starts from trained weights (crate/sources.py: a run or checkpoint folder, a
.safetensors or .pth file in this project's or a released layout, or a timm name with published
weights such as ``crate_alpha_base_patch16_224.in21k``): every tensor but the classifier loads
strictly, the classifier is new for the task's classes, a position embedding of another patch grid
is resampled, and the log (and finetune.txt in the run folder) names every tensor not loaded and why.
The model is the one the source names unless ``--model`` says otherwise. ``--freeze`` then trains the
classifier alone (a linear probe), ``--layer-decay`` scales the learning rate down layer by layer.
Named datasets are read from ``--data`` (default data/<name>) and downloaded only with ``--download``.
"""

import argparse
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import random
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import timm
import timm.data
import timm.optim
import timm.scheduler
import torch
import torch.distributed as dist
from PIL import Image
from timm.data import Mixup, auto_augment
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from . import analysis, checkpoint, data, sources
from .allocator import keep_freed_memory
from .data import collate_skipping_none
from .evaluate import ShardSampler, measure
from .model import CRATE

log = logging.getLogger("crate.train")


@dataclass
class TrainConfig:
    preset: str = "fashion-mnist"
    model: str = "crate_mini_patch7_28"  # any timm model name (crate_*, crate_alpha_*: `import crate`)
    finetune: str | None = None  # weights to start from, classifier anew (crate/sources.py; see above)
    freeze: bool = False  # train the classifier alone (a linear probe); every other tensor stays as loaded
    layer_decay: float = 0.0  # layer-wise lr decay through timm's parameter groups (0: off; e.g. 0.75)
    # fashion-mnist, digits (scikit-learn's, 28×28), imagenet (a folder with train/ and val/), folder,
    # torch/cifar10, torch/cifar100, hfds/<name>, wds/<name>, ..., torchvision/flowers102,
    # torchvision/oxford_iiit_pet (crate.data.open_split)
    dataset: str = "fashion-mnist"
    data: str | None = None  # dataset folder (fashion-mnist: crate.data's default; named ones: data/<name>)
    download: bool = False  # fetch a named dataset into --data when missing (never without this flag)
    train_split: str = "train"
    val_split: str = "validation"
    labels_per_class: int = 0  # digits: k training labels per class, drawn with the seed (0: all)
    num_classes: int = 0  # the class count, for datasets that do not declare theirs (0: the dataset's)
    eval_crop_pct: float = 0.0  # evaluation resize/crop ratio (0: the model's, e.g. 0.875: 256 -> 224)
    eval_crop_mode: str = "center"  # timm's crop_mode: "center", or "squash" (resize without cropping)
    output: str = "runs/fashion-mnist"  # run folder: config.json, metrics.jsonl, checkpoints
    epochs: int = 10
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
    # timm policy string, e.g. "rand-m9-mstd0.5-inc1", or "tv-rand-n2-m14" for torchvision's RandAugment
    # (the official fine-tuning's); image datasets only
    auto_augment: str | None = None
    reprob: float = 0.0  # random erasing probability (image datasets only)
    color_jitter: float = (
        0.0  # brightness/contrast/saturation jitter without RandAugment (timm's default: 0.4)
    )
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
    telemetry_batch: int = 64  # fixed evaluation images for the per-layer white-box telemetry (0: none)
    eval_every: int = 1  # epochs between evaluations (and epoch-end checkpoints); the last step always
    train_subset: int = 0  # use only the first n training images (0: all)
    eval_subset: int = 0
    max_steps: int = 0  # stop after this many optimizer steps (0: run all epochs)
    max_nonfinite_steps: int = 10  # skipped steps (NaN/inf loss or gradient) in a row before the run stops
    resume: bool = False
    log_every: int = 20


PRESETS = {
    # TrainConfig's defaults, without horizontal flips: in the demo's 10 epochs the flips cost more fitting
    # than they add (README "What make demo shows")
    "fashion-mnist": dict(hflip=0.0),
    "paper": dict(  # the published ImageNet-1K recipe (docs/architecture.md §4.2)
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
        model="crate_alpha_base_patch16_224",
        finetune="crate_alpha_base_patch16_224.in21k",
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
    # The official fine-tuning (Ma-Lab-Berkeley/CRATE finetune.py, docs/architecture.md §4.3 and
    # README "Transfer"): an ImageNet-trained CRATE (--finetune SOURCE) on CIFAR-10 at 224² inputs.
    # CIFAR-100: same; Flowers-102 and Oxford-IIIT Pets: --lr 1e-4 --epochs 400 and their dataset names.
    # The official head is LayerNorm + Linear re-created; here the Linear is new and the LayerNorm
    # (fc_norm) is loaded. Mixed precision is bf16 autocast (the official script: fp16 with a scaler).
    "transfer": dict(
        model="crate_base_patch16_224",
        dataset="torch/cifar10",
        output="runs/transfer-cifar10",
        epochs=200,
        batch_size=256,
        lr=5e-5,
        lr_batch=256,
        min_lr=0.0,
        warmup_epochs=0.0,  # cosine from the first step, no warm-up
        weight_decay=0.01,  # AdamW(weight_decay=0.01), betas (0.9, 0.999)
        opt="adamw",
        label_smoothing=0.0,
        auto_augment="tv-rand-n2-m14",  # torchvision's RandAugment(2, 14) after crop and flip
        hflip=0.5,
        eval_crop_pct=1.0,  # the official test transform: Resize((224, 224)), no crop
        eval_crop_mode="squash",
        workers=8,
        checkpoint_every=1000,
    ),
}


def resolve_config(argv: list[str] | None = None) -> TrainConfig:
    """Preset values, then every command-line override."""
    parser = argparse.ArgumentParser(prog="crate train", description=__doc__.splitlines()[0])
    parser.error = _exit_with  # one line, without the usage (crate train --help prints it)
    for field in dataclasses.fields(TrainConfig):
        flag = f"--{field.name.replace('_', '-')}"
        if field.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction)
        else:
            parser.add_argument(flag, type=field.type if field.type in (int, float) else str)
    args = {key: value for key, value in vars(parser.parse_args(argv)).items() if value is not None}
    preset = args.get("preset", TrainConfig.preset)
    values = PRESETS.get(preset, {}) | args
    if values.get("finetune") and "model" not in args:  # the architecture the source names, if any
        values["model"] = sources.source_model_name(values["finetune"]) or values.get(
            "model", TrainConfig.model
        )
    config = TrainConfig(**values)
    try:
        check_config(config)
    except ConfigError as error:
        _exit_with(error)
    return config


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the option and what it expects."""


def _exit_with(error: ConfigError | str):
    print(f"crate train: error: {error}", file=sys.stderr)  # one line, before any work
    raise SystemExit(2)


def check_config(config: TrainConfig) -> None:
    """Options that cannot work alone or together, or cannot be parsed: a ConfigError naming the option."""
    if config.preset not in PRESETS:
        raise ConfigError(f"--preset {config.preset!r} is unknown; choose from {sorted(PRESETS)}")
    if not timm.is_model(config.model.split(".")[0]):
        raise ConfigError(
            f"--model {config.model!r} is not a timm model "
            "(crate_*, crate_alpha_* or a name timm.list_models() gives)"
        )
    if config.opt.lower().split("_")[-1] not in timm.optim.list_optimizers():
        raise ConfigError(f"--opt {config.opt!r} is not a timm optimizer (adamw, lion, sgd, ...)")
    for name in ("lr", "lr_batch", "batch_size", "epochs", "accum_steps", "checkpoint_every", "log_every"):
        if not getattr(config, name) > 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(config, name)}")
    if config.max_nonfinite_steps < 1 or config.keep_checkpoints < 1:
        raise ConfigError("--max-nonfinite-steps and --keep-checkpoints must be at least 1")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if config.batch_size % (world_size * config.accum_steps):
        raise ConfigError(
            f"--batch-size {config.batch_size} (global) must be divisible by world size × --accum-steps "
            f"({world_size} × {config.accum_steps})"
        )
    opt_betas(config)
    if config.freeze and not config.finetune:
        raise ConfigError(
            "--freeze trains only the classifier on top of trained weights: add --finetune SOURCE "
            "(or leave out --freeze to train every parameter)"
        )
    if not 0 <= config.layer_decay < 1:
        raise ConfigError(f"--layer-decay must be in [0, 1) (0: off; e.g. 0.75), got {config.layer_decay}")
    if config.eval_every < 1:
        raise ConfigError(f"--eval-every must be >= 1 (epochs between evaluations), got {config.eval_every}")
    if config.eval_crop_mode not in ("center", "squash", "border"):
        raise ConfigError(f"--eval-crop-mode must be center, squash or border, got {config.eval_crop_mode!r}")


def opt_betas(config: TrainConfig) -> tuple[float, float] | None:
    """--opt-betas "beta1,beta2" as a tuple, None for the optimizer's default."""
    if config.opt_betas is None or not config.opt_betas.strip():
        return None
    expected = 'two comma-separated numbers in [0, 1), e.g. "0.9,0.95"'
    try:
        betas = tuple(float(value) for value in config.opt_betas.split(","))
    except ValueError:
        raise ConfigError(f"--opt-betas must be {expected}, got {config.opt_betas!r}") from None
    if len(betas) != 2 or not all(0 <= beta < 1 for beta in betas):
        raise ConfigError(f"--opt-betas must be {expected}, got {config.opt_betas!r}")
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
        store, rank, world_size = next(dist.rendezvous("env://"))
        # torchrun's store outlives a restart (--max-restarts): keep each attempt's keys apart, or a
        # restarted rank may read a dead worker's address and fail to connect
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend, store=dist.PrefixStore(f"attempt-{attempt}", store), rank=rank, world_size=world_size
        )
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        return Distributed(dist.get_rank(), dist.get_world_size(), device)
    return Distributed(0, 1, training_device())


def training_device() -> torch.device:
    """The device of a single-process run: the GPU where there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# -- data --------------------------------------------------------------------------------------------
def open_datasets(config: TrainConfig) -> tuple[Dataset, Dataset]:
    """The training and evaluation splits, not yet prepared for a model (``prepare_datasets``)."""
    common = dict(download=config.download, seed=config.seed)
    train = data.open_split(
        config.dataset,
        config.data,
        config.train_split,
        training=True,
        labels_per_class=config.labels_per_class,
        **common,
    )
    test = data.open_split(config.dataset, config.data, config.val_split, training=False, **common)
    train_classes, test_classes = getattr(train, "classes", None), getattr(test, "classes", None)
    if config.dataset == "imagenet" and train_classes != test_classes:
        root = Path(config.data)
        raise ValueError(
            f"{root / 'val'} and {root / 'train'} must hold the same class folders (the labels are their "
            f"sorted order); only in train/: {_few(set(train_classes) - set(test_classes))}, "
            f"only in val/: {_few(set(test_classes) - set(train_classes))}"
        )
    return train, test


def _few(names: set[str]) -> str:
    names = sorted(names)
    return f"{names[:5]}{' ...' if len(names) > 5 else ''}"


def dataset_classes(config: TrainConfig, train: Dataset | None = None) -> int:
    """The task's class count: --num-classes when given, else what the training split declares."""
    if config.num_classes:
        return config.num_classes
    count = data.class_count(train if train is not None else open_datasets(config)[0])
    if count is None:
        raise ValueError(f"{config.dataset} does not declare its classes: pass --num-classes")
    return count


def prepare_datasets(config: TrainConfig, model: torch.nn.Module, train: Dataset, test: Dataset) -> None:
    """Normalise the built-in images with the model's mean and std; give image datasets the model's
    training transform (timm's: random-resized crop, flip, the --auto-augment policy, random erasing)
    and its evaluation transform (resize and centre crop by the model's crop_pct, or --eval-crop-*)."""
    data_config = timm.data.resolve_data_config({}, model=model)
    channels = data_config["input_size"][0]
    if isinstance(train, data.InMemoryImages):
        train.augment, train.hflip, train.shift, train.seed = (
            True,
            config.hflip,
            config.random_shift,
            config.seed,
        )
    data.prepare(
        train, train_transform(config, data_config), data_config["mean"], data_config["std"], channels
    )
    data.prepare(test, eval_transform(config, data_config), data_config["mean"], data_config["std"], channels)


def train_transform(config: TrainConfig, data_config: dict):
    policy = config.auto_augment
    torchvision_policy = policy if policy and policy.startswith("tv-rand-") else None
    transform = timm.data.create_transform(
        **data_config,
        is_training=True,
        auto_augment=None if torchvision_policy else policy,
        color_jitter=config.color_jitter or None,
        re_prob=config.reprob,
        hflip=config.hflip,
    )
    if torchvision_policy:
        transform.transforms.insert(
            _to_tensor_position(transform), _torchvision_rand_augment(torchvision_policy)
        )
    for op in _auto_augment_ops(transform):
        if op.aug_fn is auto_augment.posterize:
            op.aug_fn = _posterize
    return transform


def _auto_augment_ops(transform) -> Iterator:
    """The operations of timm's RandAugment (``ops``) and AutoAugment (``policy``: sub-policies)."""
    for step in transform.transforms:
        yield from getattr(step, "ops", ())
        for sub_policy in getattr(step, "policy", ()):
            yield from sub_policy


def _posterize(image: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, keeping 0 bits as Pillow did before version 11 (a black image), where newer
    Pillow raises: timm's increasing posterize asks for 0 bits at magnitude 10, which "m9-mstd0.5"
    (the deit and alpha presets) samples for about 2% of its posterize operations: training crashed."""
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return auto_augment.posterize(image, bits_to_keep, **kwargs)


def eval_transform(config: TrainConfig, data_config: dict):
    crop_pct = config.eval_crop_pct or data_config["crop_pct"]
    return timm.data.create_transform(
        **(data_config | dict(crop_pct=crop_pct, crop_mode=config.eval_crop_mode))
    )


def _to_tensor_position(transform) -> int:
    names = [type(step).__name__ for step in transform.transforms]
    return next(i for i, name in enumerate(names) if "ToTensor" in name)


def _torchvision_rand_augment(policy: str):
    """ "tv-rand-n{N}-m{M}": torchvision's RandAugment(num_ops=N, magnitude=M) (magnitudes of 31 bins),
    the official fine-tuning's augmentation (timm's own RandAugment scales magnitudes differently)."""
    from torchvision import transforms

    match = re.fullmatch(r"tv-rand-n(\d+)-m(\d+)", policy)
    if match is None:
        raise ValueError(
            f'--auto-augment {policy!r}: expected "tv-rand-n<ops>-m<magnitude>", e.g. "tv-rand-n2-m14"'
        )
    return transforms.RandAugment(num_ops=int(match[1]), magnitude=int(match[2]))


def build_datasets(config: TrainConfig, model: torch.nn.Module) -> tuple[Dataset, Dataset]:
    """Both splits, prepared for ``model`` and cut to --train-subset / --eval-subset."""
    train, test = open_datasets(config)
    prepare_datasets(config, model, train, test)
    if config.train_subset:
        train = _subset(train, config.train_subset)
    if config.eval_subset:
        test = _subset(test, config.eval_subset)
    return train, test


# -- model -------------------------------------------------------------------------------------------
def build_model(
    config: TrainConfig, num_classes: int | None = None, load_weights: bool = True
) -> torch.nn.Module:
    """timm.create_model(config.model) with the task's class count and the drop-path rate; with
    --finetune (and ``load_weights``: a resumed run restores every weight itself) the source's weights,
    all but the classifier (crate/sources.py), and with --freeze every parameter but the classifier's
    frozen. The note on what was loaded is logged and kept as ``model.finetune_report``."""
    check_config(config)
    num_classes = num_classes if num_classes is not None else dataset_classes(config)
    model = timm.create_model(
        config.model.split(".")[0], drop_path_rate=config.drop_path, num_classes=num_classes
    )
    model.finetune_report = None
    if config.finetune and load_weights:
        model.finetune_report = sources.load_for_finetuning(model, sources.read_source(config.finetune))
        log.info("%s", model.finetune_report)
    if config.freeze:
        head = sources.classifier_prefix(model) + "."
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.startswith(head))
    return model


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


# -- training ----------------------------------------------------------------------------------------
# `crate train` exits with 0 when done, 2 for a bad configuration (one line naming the option), and:
EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: SIGTERM or SIGUSR1 arrived, a checkpoint was written: resume
EXIT_NONFINITE = 65  # sysexits' EX_DATAERR: --max-nonfinite-steps steps in a row had a NaN/inf loss or
#                      gradient; the checkpoint holds the last good weights (resuming continues after them)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what clusters send before preempting (SLURM: --signal)


class PreemptedError(Exception):
    exit_code = EXIT_PREEMPTED


class NonFiniteStepsError(RuntimeError):
    exit_code = EXIT_NONFINITE


@dataclass
class Run:
    """Everything one training run holds: built once by ``set_up``, advanced by ``optimizer_step``."""

    config: TrainConfig
    distributed: Distributed
    output: Path
    model: torch.nn.Module  # the bare model: checkpoints, EMA and evaluation read it
    train_model: torch.nn.Module  # the one the step runs: compiled and/or in DistributedDataParallel
    optimizer: torch.optim.Optimizer
    scheduler: timm.scheduler.scheduler.Scheduler
    ema: ModelEmaV3 | None
    mixup: Mixup | None
    criterion: torch.nn.Module
    train_set: Dataset
    sampler: "ResumableSampler | None"  # None for a streamed dataset
    loader: DataLoader
    test_loader: DataLoader
    micro_batch: int  # images per rank per forward pass
    steps_per_epoch: int
    total_steps: int
    autocast: Callable
    telemetry_images: torch.Tensor | None
    metrics_file: TextIO | None  # rank 0's
    step: int = 0  # optimizer steps taken (skipped non-finite ones included): the data position
    saved_step: int = -1
    images_seen: int = 0  # since the last log record, all ranks
    skipped_images: int = 0  # unreadable ones
    nonfinite_steps: int = 0  # skipped for a NaN/inf loss or gradient, in this process
    nonfinite_in_a_row: int = 0


def train(config: TrainConfig) -> dict:
    """Run (or resume) training; returns the final evaluation metrics. Rank 0 writes everything.

    Raises PreemptedError after SIGTERM or SIGUSR1 (once the current step is done on every rank and a
    checkpoint is written) and NonFiniteStepsError after --max-nonfinite-steps skipped steps in a row."""
    check_before_training(config)
    run = set_up(config)
    progress = tqdm(
        mininterval=0.1 if sys.stderr.isatty() else 30,  # a log file gets a line every 30 s
        total=run.total_steps,
        initial=run.step,
        disable=not run.distributed.is_main,
        unit="step",
        dynamic_ncols=True,
    )
    result, start_time = {}, time.perf_counter()
    try:
        with StopSignals() as signals:
            while run.step < run.total_steps:
                tick = time.perf_counter()
                for micro_batches in epoch_steps(run):
                    loss, applied, stop = optimizer_step(run, micro_batches, signals.received is not None)
                    progress.update(1)
                    if run.step % run.config.log_every == 0 or run.step == run.total_steps:
                        _log_step(run, loss, tick, progress)
                        tick = time.perf_counter()
                    if not applied and run.nonfinite_in_a_row >= run.config.max_nonfinite_steps:
                        save_checkpoint(run)
                        raise NonFiniteStepsError(
                            f"{run.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or "
                            f"gradient (up to step {run.step}); the last good weights are in "
                            f"{checkpoint.step_folder(run.output, run.step)}"
                        )
                    if stop and run.step < run.total_steps:
                        save_checkpoint(run)
                        raise PreemptedError(
                            f"stopped at step {run.step} on a stop signal; checkpoint "
                            f"{checkpoint.step_folder(run.output, run.step)}: rerun with --resume"
                        )
                    if checkpoint_due(run):
                        save_checkpoint(run)
                    if evaluation_due(run):
                        result = evaluate(run, start_time)
                        progress.write(_summary(result))
    finally:
        progress.close()
        if run.metrics_file:
            run.metrics_file.close()
    if dist.is_initialized():
        dist.barrier()
    return result


# -- run set-up --------------------------------------------------------------------------------------
def check_before_training(config: TrainConfig) -> None:
    """What would fail later, checked before any work: the options (check_config), the data, and an
    output folder holding another run's configuration."""
    check_config(config)
    check_data(config)
    saved = Path(config.output) / "config.json"
    if saved.exists() and not _resuming(config):
        differing = _differing_fields(json.loads(saved.read_text()), dataclasses.asdict(config))
        if differing:
            raise ConfigError(
                f"--output {config.output} holds another run (its config.json differs in "
                f"{', '.join(differing)}): "
                "pass --resume to continue it, or choose another --output"
            )


def _differing_fields(saved: dict, current: dict) -> list[str]:
    keys = (saved.keys() | current.keys()) - {"resume"}
    return sorted(key for key in keys if saved.get(key) != current.get(key))


def check_data(config: TrainConfig) -> None:
    """The dataset is where --data says (or --download may fetch it): ConfigError naming --data."""
    if config.dataset == "fashion-mnist":
        try:
            data.fashion_mnist_root(config.data)
        except FileNotFoundError as error:
            raise ConfigError(f"--data: {error}") from error
    elif config.dataset == "imagenet":
        for split in ("train", "val"):
            folder = Path(config.data or "") / split
            if not folder.is_dir():
                raise ConfigError(
                    f"--data: ImageNet not found: {folder} is not a folder. Pass --data with a folder "
                    "holding train/ and val/ in torchvision's ImageFolder layout (one sub-folder per class)"
                )


def _resuming(config: TrainConfig) -> bool:
    """--resume, or a torchrun restart (--max-restarts) of a run that has written a checkpoint."""
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    return config.resume or (restarted and (Path(config.output) / checkpoint.LATEST).is_file())


def set_up(config: TrainConfig) -> Run:
    """Processes, model, data, optimizer and schedule; restored from the newest checkpoint when resuming."""
    distributed = setup_distributed()
    device = distributed.device
    if device.type == "cpu":
        keep_freed_memory()  # crate/allocator.py: 5–18% faster CPU steps
    output = Path(config.output)
    resuming = _resuming(config)
    if distributed.is_main:
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    _seed_everything(config.seed)  # the same initial model (and EMA) on every rank

    train_set, test_set = open_datasets(config)
    model = build_model(config, dataset_classes(config, train_set), load_weights=not resuming)
    if distributed.is_main and model.finetune_report is not None:
        (output / "finetune.txt").write_text(f"{model.finetune_report}\n")
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)
    prepare_datasets(config, model, train_set, test_set)
    if not isinstance(train_set, (data.InMemoryImages, torch.utils.data.IterableDataset)):
        train_set = data.SeededSamples(train_set, config.seed)  # augmentation exact after a resume
    if config.train_subset:
        train_set = _subset(train_set, config.train_subset)
    if config.eval_subset:
        test_set = _subset(test_set, config.eval_subset)
    micro_batch = config.batch_size // (distributed.world_size * config.accum_steps)
    sampler, loader, test_loader = make_loaders(config, distributed, train_set, test_set, micro_batch)
    streamed = sampler is None  # wds/, hfids/, tfds/ shard and shuffle themselves per rank and worker
    steps_per_epoch = (len(train_set) if streamed else len(sampler)) // (micro_batch * config.accum_steps)
    if steps_per_epoch == 0:
        raise ValueError(f"the training set ({len(train_set)} images) is smaller than one global batch")
    optimizer, scheduler = make_optimizer(config, model, steps_per_epoch)
    ema = ModelEmaV3(model, decay=config.ema_decay) if config.ema_decay > 0 else None
    mixup, criterion = make_loss(config, model.num_classes)

    _seed_everything(config.seed + distributed.rank)  # then per-rank streams for dropout, drop-path, Mixup
    step = checkpoint.restore(output, model, optimizer, ema, device, distributed.rank) if resuming else 0
    train_model = torch.compile(model) if config.compile else model
    if dist.is_initialized():
        train_model = DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    return Run(
        config=config,
        distributed=distributed,
        output=output,
        model=model,
        train_model=train_model,
        optimizer=optimizer,
        scheduler=scheduler,
        ema=ema,
        mixup=mixup,
        criterion=criterion,
        train_set=train_set,
        sampler=sampler,
        loader=loader,
        test_loader=test_loader,
        micro_batch=micro_batch,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        autocast=_autocast(config, device),
        telemetry_images=_first_images(test_set, config.telemetry_batch),
        metrics_file=(output / "metrics.jsonl").open("a") if distributed.is_main else None,
        step=step,
        saved_step=step if resuming else -1,
    )


def make_loaders(
    config: TrainConfig, distributed: Distributed, train_set: Dataset, test_set: Dataset, micro_batch: int
) -> tuple["ResumableSampler | None", DataLoader, DataLoader]:
    """The training loader (a resumable sampler unless the dataset streams) and the evaluation loader,
    which gives each rank a disjoint share of the evaluation set. Each has its own generator, so
    starting one (it draws its workers' base seed) leaves the global RNG streams alone."""
    streamed = isinstance(train_set, torch.utils.data.IterableDataset)
    sampler = (
        None
        if streamed
        else ResumableSampler(train_set, distributed, config.seed, micro_batch * config.accum_steps)
    )
    loader = DataLoader(
        train_set,
        micro_batch,
        sampler=sampler,
        num_workers=config.workers,
        collate_fn=collate_skipping_none,
        drop_last=True,
        persistent_workers=False,
        generator=torch.Generator(),
    )
    test_loader = DataLoader(
        test_set,
        256,
        sampler=None
        if isinstance(test_set, torch.utils.data.IterableDataset)
        else ShardSampler(len(test_set), distributed.rank, distributed.world_size),
        num_workers=config.workers,
        collate_fn=collate_skipping_none,
        generator=torch.Generator().manual_seed(config.seed),
    )
    return sampler, loader, test_loader


def make_optimizer(config: TrainConfig, model: torch.nn.Module, steps_per_epoch: int):
    """timm's optimizer (lr scaled linearly to the global batch) and its cosine schedule by step."""
    lr = config.lr * config.batch_size / config.lr_batch
    betas = opt_betas(config)
    optimizer = timm.optim.create_optimizer_v2(
        model,
        config.opt,
        lr=lr,
        weight_decay=config.weight_decay,
        layer_decay=config.layer_decay or None,
        **({"betas": betas} if betas else {}),
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
    return optimizer, scheduler


def make_loss(config: TrainConfig, num_classes: int) -> tuple[Mixup | None, torch.nn.Module]:
    """Mixup/CutMix (None when both are off) and the loss: soft-target cross-entropy after Mixup, else
    cross-entropy with label smoothing."""
    if not (config.mixup or config.cutmix):
        return None, torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    mixup = Mixup(
        mixup_alpha=config.mixup,
        cutmix_alpha=config.cutmix,
        label_smoothing=config.label_smoothing,
        num_classes=num_classes,
    )
    return mixup, SoftTargetCrossEntropy()


# -- one optimizer step with its guards --------------------------------------------------------------
def epoch_steps(run: Run) -> Iterator[list]:
    """The current epoch's remaining optimizer steps, each a list of --accum-steps micro-batches."""
    epoch, batch_in_epoch = divmod(run.step, run.steps_per_epoch)
    if run.sampler is not None:
        run.sampler.set_epoch(epoch, batch_in_epoch)
    elif batch_in_epoch:  # a stream cannot skip to a batch: the epoch's remaining steps see its start
        log.warning("resumed mid-epoch on a streamed dataset: epoch %d's stream restarts", epoch)
    getattr(run.train_set, "set_epoch", lambda e: None)(epoch)
    run.loader.generator.manual_seed(hash((run.config.seed, epoch, run.distributed.rank)) % 2**63)
    run.model.train()
    micro_batches = iter(run.loader)
    for _ in range(min(run.steps_per_epoch - batch_in_epoch, run.total_steps - run.step)):
        step_batches = list(itertools.islice(micro_batches, run.config.accum_steps))
        if len(step_batches) < run.config.accum_steps:  # a stream may yield fewer batches than an epoch's
            return
        yield step_batches


def optimizer_step(run: Run, micro_batches: list, stop_requested: bool) -> tuple[torch.Tensor, bool, bool]:
    """Forward and backward over one step's micro-batches, then the optimizer, schedule and EMA update,
    unless the loss or a gradient is NaN or inf on any rank: then every rank skips the update alike.
    Returns (mean loss, whether the update was applied, whether any rank was asked to stop)."""
    config, device = run.config, run.distributed.device
    loss = torch.zeros((), device=device)
    for index, batch in enumerate(micro_batches):
        if batch is None:  # every image of the micro-batch was unreadable
            run.skipped_images += run.micro_batch
            continue
        run.skipped_images += run.micro_batch - len(batch[1])
        images, targets = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if run.mixup:
            images, targets = run.mixup(images, targets)
        last = index == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not dist.is_initialized() else run.train_model.no_sync()
        with sync, run.autocast():
            micro_loss = run.criterion(run.train_model(images), targets) / config.accum_steps
            micro_loss.backward()
        loss += micro_loss.detach().float()
        run.images_seen += len(images) * run.distributed.world_size
    gradients = [p.grad for p in run.model.parameters() if p.grad is not None]
    if config.grad_clip:
        grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm(gradients)
    finite, stop = _on_every_rank(torch.isfinite(loss) & torch.isfinite(grad_norm), stop_requested)
    if finite:
        run.optimizer.step()
        run.nonfinite_in_a_row = 0
    else:
        _report_nonfinite(run, loss)
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    if finite:
        run.scheduler.step_update(run.step)
        if run.ema is not None:
            run.ema.update(run.model, step=run.step)
    return loss, finite, stop


def _on_every_rank(finite: torch.Tensor, stop_requested: bool) -> tuple[bool, bool]:
    """(finite on every rank, stop asked on any rank): one all-reduce, so that all ranks decide alike."""
    flags = torch.stack([~finite, torch.tensor(stop_requested, device=finite.device)]).float()
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    nonfinite, stop = flags.tolist()
    return not nonfinite, bool(stop)


def _report_nonfinite(run: Run, loss: torch.Tensor) -> None:
    run.nonfinite_steps += 1
    run.nonfinite_in_a_row += 1
    parameter = next(
        (n for n, p in run.model.named_parameters() if p.grad is not None and not p.grad.isfinite().all()),
        None,
    )
    log.warning(
        "step %d: loss %s, first non-finite gradient: %s; optimizer and schedule update skipped "
        "(%d in a row, %d in all)",
        run.step + 1,
        loss.item(),
        parameter,
        run.nonfinite_in_a_row,
        run.nonfinite_steps,
    )
    _write(
        run.metrics_file,
        dict(
            step=run.step + 1,
            nonfinite_loss=loss.item(),
            nonfinite_gradient=parameter,
            nonfinite_steps=run.nonfinite_steps,
        ),
    )


def _log_step(run: Run, loss: torch.Tensor, tick: float, progress: tqdm) -> None:
    record = dict(
        step=run.step,
        epoch=run.step / run.steps_per_epoch,
        loss=loss.item(),
        lr=run.optimizer.param_groups[0]["lr"],
        images_per_s=run.images_seen / (time.perf_counter() - tick),
        nonfinite_steps=run.nonfinite_steps,
    )
    progress.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['images_per_s']:.0f}")
    _write(run.metrics_file, record)
    run.images_seen = 0


# -- checkpoints and stop signals --------------------------------------------------------------------
def checkpoint_due(run: Run) -> bool:
    return run.step % run.config.checkpoint_every == 0 or _epoch_end(run) or run.step == run.total_steps


def save_checkpoint(run: Run) -> None:
    """Rank 0 writes the model, optimizer and every rank's RNG states (gathered); all ranks wait for it."""
    if run.saved_step == run.step:
        return
    states = [checkpoint.rng_state()]
    if dist.is_initialized():
        gathered = [None] * run.distributed.world_size if run.distributed.is_main else None
        dist.gather_object(states[0], gathered, dst=0)
        states = gathered
    if run.distributed.is_main:
        checkpoint.save(
            run.output, run.step, run.model, run.optimizer, run.ema, run.config.keep_checkpoints, states
        )
    if dist.is_initialized():
        dist.barrier()
    run.saved_step = run.step


class StopSignals:
    """While open, SIGTERM and SIGUSR1 set ``received`` instead of ending the process: the training loop
    finishes the step, agrees with the other ranks, checkpoints and raises PreemptedError."""

    def __enter__(self) -> "StopSignals":
        self.received, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():  # Python handles signals there only
            self.previous = {number: signal.signal(number, self._handle) for number in STOP_SIGNALS}
        return self

    def _handle(self, number: int, frame) -> None:
        self.received = signal.Signals(number).name
        log.warning("%s received: stopping after this step with a checkpoint", self.received)

    def __exit__(self, *exception) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)


# -- evaluation --------------------------------------------------------------------------------------
def _epoch_end(run: Run) -> bool:
    epoch, batch_in_epoch = divmod(run.step, run.steps_per_epoch)
    return batch_in_epoch == 0 and epoch % run.config.eval_every == 0


def evaluation_due(run: Run) -> bool:
    return _epoch_end(run) or run.step == run.total_steps


def evaluate(run: Run, start_time: float) -> dict:
    """Top-1, top-5 and loss over the whole evaluation set (each image once, over all ranks), of the EMA
    model when there is one, and the white-box telemetry of CRATE models; written to metrics.jsonl."""
    if run.skipped_images:
        log.warning("%d unreadable training images skipped so far (paths logged above)", run.skipped_images)
    evaluated = run.ema.module if run.ema is not None else run.model
    device = run.distributed.device
    result = dict(
        step=run.step,
        epoch=run.step / run.steps_per_epoch,
        **measure(evaluated, run.test_loader, device, run.autocast),
    )
    result["train_time_s"] = time.perf_counter() - start_time
    if isinstance(evaluated, CRATE) and run.telemetry_images is not None:  # CRATE and CRATE-α (a subclass)
        result["whitebox_images"] = len(run.telemetry_images)
        result["whitebox"] = analysis.audit(evaluated, run.telemetry_images.to(device))
    _write(run.metrics_file, result)
    return result


def _first_images(dataset: Dataset, count: int) -> torch.Tensor | None:
    """The first ``count`` images of a dataset (of a stream: the first it yields), stacked; None for 0."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        items = itertools.islice(iter(dataset), count)
    else:
        items = (dataset[index] for index in range(min(count, len(dataset))))
    images = [item[0] for item in items if item is not None]
    return torch.stack(images) if images else None


def _summary(result: dict) -> str:
    return (
        f"epoch {result['epoch']:.2f}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
        f"eval loss {result['eval_loss']:.4f}  ({result['train_time_s']:.0f} s)"
    )


def _autocast(config: TrainConfig, device: torch.device):
    enabled = uses_bf16(config, device)
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def uses_bf16(config: TrainConfig, device: torch.device) -> bool:
    """Whether the run computes in bf16 autocast (else float32): --amp on a GPU or a native-bf16 CPU."""
    return config.amp and _autocast_enabled(device)


def _autocast_enabled(device: torch.device) -> bool:
    return device.type == "cuda" or _cpu_has_native_bf16()


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
    try:
        result = train(config)
    except ConfigError as error:
        _exit_with(error)
    except (PreemptedError, NonFiniteStepsError) as stop:
        log.error("%s", stop)
        if dist.is_initialized():
            dist.destroy_process_group()
        raise SystemExit(stop.exit_code) from None
    if result and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "whitebox"}))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
