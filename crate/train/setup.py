"""Everything a training run holds, built before its first step: processes, data, model, optimizer,
schedule, loss; restored from the newest checkpoint when the run resumes."""

import dataclasses
import itertools
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import timm
import timm.data
import timm.optim
import timm.scheduler
import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.models import split_model_name_tag
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
from torch.utils.data import DataLoader, Dataset

from .. import data
from ..runtime import Distributed, autocast, keep_freed_memory, seed_everything, setup_distributed, uses_bf16
from ..weights import checkpoint, sources
from .compiled import SDPA_KERNELS, compiles, forward_loss, takes_fused
from .config import SESSION_OPTIONS, ConfigError, TrainConfig
from .objective import Classification, Reconstruction, is_masked_autoencoder, make_objective
from .objective import make_loss as make_loss  # where crate/demo.py imports it from

log = logging.getLogger("crate.train")


@dataclass
class Run:
    """Everything one training run holds: built once by ``set_up``, advanced by ``optimizer_step``."""

    config: TrainConfig
    distributed: Distributed
    output: Path
    model: torch.nn.Module  # the bare model: checkpoints, EMA and evaluation read it
    train_model: torch.nn.Module  # the one the step runs: the model, or it in DistributedDataParallel
    compiled: bool  # --compile, or its default for the device (crate/train/compiled.py)
    forward_loss: Callable  # (images, targets) -> loss: train_model and the criterion, compiled or eager
    optimizer: torch.optim.Optimizer
    scheduler: timm.scheduler.scheduler.Scheduler
    ema: ModelEmaV3 | None
    objective: Classification | Reconstruction  # the model's: labels, or its masked patches
    train_set: Dataset
    sampler: data.ResumableSampler | None  # None for a streamed dataset
    loader: DataLoader
    test_loader: DataLoader
    micro_batch: int  # images per rank per forward pass
    inputs: Callable  # a batch -> (images, targets) on the device (--data-pipeline gpu: decoded there)
    prefetch: bool  # inputs prepared in a thread while the step before runs (crate/data/prefetch.py)
    steps_per_epoch: int
    total_steps: int  # the run's planned steps: its epochs, or --max-steps when fewer
    session_end: int  # the step this session stops at: total_steps, or --stop-after when sooner
    autocast: Callable
    telemetry_images: torch.Tensor | None
    metrics_file: TextIO | None  # rank 0's
    step: int = 0  # optimizer steps taken (skipped non-finite ones included): the data position
    saved_step: int = -1
    images_seen: int = 0  # since the last log record, all ranks
    skipped_images: int = 0  # unreadable ones
    nonfinite_steps: int = 0  # skipped for a NaN/inf loss or gradient, in this process
    nonfinite_in_a_row: int = 0

    @property
    def mixup(self) -> Mixup | None:
        return self.objective.mixup

    @property
    def criterion(self) -> torch.nn.Module:  # (the model's output, targets) -> loss
        return self.objective.criterion


def check_sdpa_backend(backend: str, device: torch.device, bf16: bool) -> None:
    """Refuse, before any work, an SDPA backend that PyTorch has no kernel for on this device in this
    precision (SDPA_KERNELS): cudnn and efficient are CUDA kernels, and cudnn's and flash's CUDA
    kernels take fp16/bf16 only, so a float32 CUDA run (--no-amp) gets efficient, math or auto."""
    kernels = SDPA_KERNELS.get(device.type, {"math": False})
    runnable = [name for name, low_precision_only in kernels.items() if bf16 or not low_precision_only]
    if backend == "auto" or backend in runnable:
        return
    use = f"use {', '.join(runnable)} or auto"
    if backend in kernels:
        raise ConfigError(
            f"--sdpa-backend {backend} takes bf16 or fp16 only on {device.type} and this run computes in "
            f"float32 (--no-amp): {use}, or train under bf16 autocast (drop --no-amp)"
        )
    raise ConfigError(f"--sdpa-backend {backend} has no kernel on {device.type}: {use}")


def set_up(config: TrainConfig) -> Run:
    """Processes, model, data, optimizer and schedule; restored from the newest checkpoint when resuming."""
    distributed = setup_distributed()
    device = distributed.device
    check_sdpa_backend(config.sdpa_backend, device, uses_bf16(device, config.amp))
    if device.type == "cpu":
        keep_freed_memory()  # no page faults for each step's activations
    output = Path(config.output)
    resuming = is_resuming(config)
    if distributed.is_main:
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    seed_everything(config.seed)  # the same initial model (and EMA) on every rank

    train_set, test_set = open_datasets(config)
    model = build_model(
        config,
        0 if is_masked_autoencoder(config.model) else dataset_classes(config, train_set),
        not resuming,
        1 if isinstance(train_set, data.InMemoryImages) else 0,
    )
    if distributed.is_main and model.finetune_report is not None:
        (output / "finetune.txt").write_text(f"{model.finetune_report}\n")
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)
    train_set, test_set = ready_datasets(config, model, train_set, test_set)
    micro_batch = config.batch_size // (distributed.world_size * config.accum_steps)
    sampler, loader, test_loader = make_loaders(config, distributed, train_set, test_set, micro_batch)
    streamed = sampler is None  # wds/, hfids/, tfds/ shard and shuffle themselves per rank and worker
    steps_per_epoch = (len(train_set) if streamed else len(sampler)) // (micro_batch * config.accum_steps)
    if steps_per_epoch == 0:
        raise ConfigError(f"the training set ({len(train_set)} images) is smaller than one global batch")
    optimizer, scheduler = make_optimizer(config, model, steps_per_epoch)
    ema = ModelEmaV3(model, decay=config.ema_decay) if config.ema_decay > 0 else None
    objective = make_objective(config, model)

    seed_everything(config.seed + distributed.rank)  # then per-rank streams for dropout, drop-path, Mixup
    step = checkpoint.restore(output, model, optimizer, ema, device, distributed.rank) if resuming else 0
    compiled = compiles(config.compile, device)
    set_fused(optimizer, compiled)  # after the restore: a checkpoint's param_groups carry their own flag
    train_model = model
    if dist.is_initialized():
        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    run_autocast = autocast(device, config.amp)
    loss = forward_loss(
        train_model, objective.criterion, run_autocast, config.compile_mode if compiled else None
    )
    total_steps = planned_steps(config, steps_per_epoch)
    return Run(
        config=config,
        distributed=distributed,
        output=output,
        model=model,
        train_model=train_model,
        compiled=compiled,
        forward_loss=loss,
        optimizer=optimizer,
        scheduler=scheduler,
        ema=ema,
        objective=objective,
        train_set=train_set,
        sampler=sampler,
        loader=loader,
        test_loader=test_loader,
        micro_batch=micro_batch,
        inputs=batch_inputs(train_set, device),
        prefetch=prefetches(train_set, device),
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        session_end=min(total_steps, config.stop_after or total_steps),
        autocast=run_autocast,
        telemetry_images=first_images(test_set, config.telemetry_batch),
        metrics_file=(output / "metrics.jsonl").open("a") if distributed.is_main else None,
        step=step,
        saved_step=step if resuming else -1,
    )


def check_before_training(config: TrainConfig) -> None:
    """What would fail later, checked before any work (the options checked themselves): the data, the
    augmentation --data-pipeline gpu must reproduce, and an output folder holding another run's
    configuration."""
    check_data(config)
    check_data_pipeline(config)
    saved = Path(config.output) / "config.json"
    if saved.exists() and not is_resuming(config):
        differing = _differing_fields(json.loads(saved.read_text()), dataclasses.asdict(config))
        if differing:
            raise ConfigError(
                f"--output {config.output} holds another run (its config.json differs in "
                f"{', '.join(differing)}): "
                "pass --resume to continue it, or choose another --output"
            )


def _differing_fields(saved: dict, current: dict) -> list[str]:
    keys = (saved.keys() | current.keys()) - SESSION_OPTIONS
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


def check_data_pipeline(config: TrainConfig) -> None:
    """--data-pipeline gpu reproduces the run's training transform (UnsupportedAugmentationError names the
    step it does not), checked on the model's data config (its model built on the meta device)."""
    if config.data_pipeline != "gpu":
        return
    with torch.device("meta"):
        model = timm.create_model(split_model_name_tag(config.model)[0])
    data.DevicePipeline(transforms(config, timm.data.resolve_data_config({}, model=model))[0])


def is_resuming(config: TrainConfig) -> bool:
    """--resume, or a torchrun restart (--max-restarts), of a run that has written a checkpoint (one
    stopped before its first starts again at step 0)."""
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    return (config.resume or restarted) and (Path(config.output) / checkpoint.LATEST).is_file()


def planned_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """The run's optimizer steps: all its epochs', or --max-steps when fewer."""
    return min(config.epochs * steps_per_epoch, config.max_steps or config.epochs * steps_per_epoch)


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
        raise ConfigError(
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
        raise ConfigError(f"{config.dataset} does not declare its classes: pass --num-classes")
    return count


def ready_datasets(
    config: TrainConfig, model: torch.nn.Module, train: Dataset, test: Dataset
) -> tuple[Dataset, Dataset]:
    """Both splits as the run reads them: the built-in images normalised with the model's mean and
    std; image datasets with the model's training transform (timm's: random-resized crop, flip, the
    --auto-augment policy, random erasing), each sample's augmentation seeded, and its evaluation
    transform (resize and centre crop by the model's crop_pct, or --eval-crop-*); cut to
    --train-subset and --eval-subset. With --data-pipeline gpu the training split yields encoded
    images and their drawn augmentation (crate/data/encoded.py), applied on the device."""
    data_config = timm.data.resolve_data_config({}, model=model)
    channels = data_config["input_size"][0]
    if isinstance(train, data.InMemoryImages):
        train.augment, train.hflip, train.shift, train.seed = (
            True,
            config.hflip,
            config.random_shift,
            config.seed,
        )
    training, evaluation = transforms(config, data_config)
    if config.data_pipeline == "gpu":
        if not isinstance(train, data.ImageFilesSkippingCorrupt) or channels != 3:
            raise ConfigError(
                f"--data-pipeline gpu reads RGB image files for a 3-channel model; {config.dataset} gave "
                f"{type(train).__name__} and {config.model} reads {channels} channels: "
                "use --data-pipeline cpu"
            )
        train = data.EncodedImages(train, data.DevicePipeline(training))
    else:
        data.prepare(train, training, data_config["mean"], data_config["std"], channels)
    data.prepare(test, evaluation, data_config["mean"], data_config["std"], channels)
    if not isinstance(train, (data.InMemoryImages, torch.utils.data.IterableDataset)):
        train = data.SeededSamples(train, config.seed)  # augmentation exact after a resume
    if config.train_subset:
        train = data.first(train, config.train_subset)
    if config.eval_subset:
        test = data.first(test, config.eval_subset)
    return train, test


def transforms(config: TrainConfig, data_config: dict) -> tuple:
    """The run's training and evaluation transforms for a model's timm data config."""
    scale = dict(scale=config.scale) if config.scale else {}
    training = data.train_transform(
        data_config | scale, config.auto_augment, config.color_jitter, config.reprob, config.hflip
    )
    return training, data.eval_transform(data_config, config.eval_crop_pct, config.eval_crop_mode)


def batch_inputs(train_set: Dataset, device: torch.device) -> Callable:
    """A training batch -> (images, targets) on ``device``: moved there, or decoded and augmented
    there when the training set yields encoded images (--data-pipeline gpu)."""
    encoded = data.encoded_images(train_set)
    if encoded is not None:
        return lambda batch: encoded.inputs(batch, device)
    return lambda batch: (batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True))


def prefetches(train_set: Dataset, device: torch.device) -> bool:
    """Whether each batch's inputs are prepared while the step before runs: with --data-pipeline gpu on
    CUDA, where decoding and augmenting the batch is the training process's own work and overlaps the
    step on a side stream. With the cpu pipeline a batch's inputs are a copy to the device, and on a
    CPU device the thread would take the step's own cores."""
    return device.type == "cuda" and data.encoded_images(train_set) is not None


def build_model(
    config: TrainConfig, num_classes: int | None = None, load_weights: bool = True, dataset_chans: int = 0
) -> torch.nn.Module:
    """timm.create_model(config.model) with the task's class count and the drop-path rate; with
    --finetune (and ``load_weights``: a resumed run restores every weight itself) the source's weights,
    all but the classifier (crate/weights/sources.py), and with --freeze every parameter but the classifier's
    frozen. The note on what was loaded is logged and kept as ``model.finetune_report``."""
    autoencoder = is_masked_autoencoder(config.model)
    if num_classes is None:
        num_classes = 0 if autoencoder else dataset_classes(config)
    in_chans = config.in_chans or dataset_chans  # 0: the model's own (an image folder is read in its mode)
    model = timm.create_model(
        split_model_name_tag(config.model)[0],
        drop_path_rate=config.drop_path,
        num_classes=num_classes,
        **(dict(in_chans=in_chans) if in_chans else {}),
        **(dict(mask_ratio=config.mask_ratio) if autoencoder and config.mask_ratio else {}),
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


def make_loaders(
    config: TrainConfig, distributed: Distributed, train_set: Dataset, test_set: Dataset, micro_batch: int
) -> tuple[data.ResumableSampler | None, DataLoader, DataLoader]:
    """The training loader (a resumable sampler unless the dataset streams) and the evaluation loader,
    which gives each rank a disjoint share of the evaluation set. Each has its own generator, so
    starting one (it draws its workers' base seed) leaves the global RNG streams alone."""
    streamed = isinstance(train_set, torch.utils.data.IterableDataset)
    sampler = (
        None
        if streamed
        else data.ResumableSampler(
            train_set, distributed.rank, distributed.world_size, config.seed, micro_batch * config.accum_steps
        )
    )
    loader = DataLoader(
        train_set,
        micro_batch,
        sampler=sampler,
        num_workers=config.workers,
        collate_fn=data.collate_encoded if data.encoded_images(train_set) else data.collate_skipping_none,
        drop_last=True,
        persistent_workers=False,
        generator=torch.Generator(),
    )
    test_loader = DataLoader(
        test_set,
        256,
        sampler=None
        if isinstance(test_set, torch.utils.data.IterableDataset)
        else data.ShardSampler(len(test_set), distributed.rank, distributed.world_size),
        num_workers=config.workers,
        collate_fn=data.collate_skipping_none,
        generator=torch.Generator().manual_seed(config.seed),
    )
    return sampler, loader, test_loader


def make_optimizer(config: TrainConfig, model: torch.nn.Module, steps_per_epoch: int):
    """timm's optimizer (lr scaled linearly to the global batch) and its cosine schedule by step over
    the planned steps: a run shortened by --max-steps warms up and decays in proportion."""
    lr = config.lr * config.batch_size / config.lr_batch
    betas = config.betas
    optimizer = timm.optim.create_optimizer_v2(
        model,
        config.opt,
        lr=lr,
        weight_decay=config.weight_decay,
        layer_decay=config.layer_decay or None,
        **({"betas": betas} if betas else {}),
    )
    if betas is not None and "betas" not in optimizer.param_groups[0]:  # timm drops unknown arguments
        raise ConfigError(
            f"--opt-betas {config.opt_betas}: optimizer {config.opt!r} ({type(optimizer).__name__}) takes no "
            "betas; leave out --opt-betas or choose an optimizer with betas (adamw, adam, lion, ...)"
        )
    planned, full = planned_steps(config, steps_per_epoch), config.epochs * steps_per_epoch
    scheduler, _ = timm.scheduler.create_scheduler_v2(
        optimizer,
        "cosine",
        num_epochs=planned,
        warmup_epochs=round(config.warmup_epochs * steps_per_epoch * planned / full),
        min_lr=config.min_lr,
        warmup_lr=lr * 1e-3,
        step_on_epochs=False,
        updates_per_epoch=1,  # "epochs" here are steps
    )
    return optimizer, scheduler


def set_fused(optimizer: torch.optim.Optimizer, fused: bool) -> bool:
    """Switch a torch.optim optimizer with a fused kernel (AdamW, Adam, SGD, ...) to it, or back to its
    default multi-tensor loop, where its parameters' device has the kernel; True when fused. Set on the
    groups, which the optimizer reads at each step (the constructor's ``fused=True`` sets the same)."""
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    devices = _get_fused_kernels_supported_devices()
    fused = fused and takes_fused(type(optimizer)) and all(p.device.type in devices for p in parameters)
    for group in optimizer.param_groups:
        if "fused" in group:
            group["fused"] = fused or None  # None: the constructor's default (foreach where it can)
            if fused:
                group["foreach"] = None
    return fused


def first_images(dataset: Dataset, count: int) -> torch.Tensor | None:
    """The first ``count`` images of a dataset (of a stream: the first it yields), stacked; None for 0."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        items = itertools.islice(iter(dataset), count)
    else:
        items = (dataset[index] for index in range(min(count, len(dataset))))
    images = [item[0] for item in items if item is not None]
    return torch.stack(images) if images else None
