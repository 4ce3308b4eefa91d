"""The training configuration: every option of `crate train`, checked once, when it is built."""

import inspect
import os
import re
from dataclasses import dataclass

import timm
import timm.optim

from ..errors import InvalidError
from .compiled import MODES, SDPA_BACKENDS
from .presets import PRESETS


class ConfigError(InvalidError):
    """A configuration that cannot run; the message names the option and what it expects."""


# what may differ when a run continues (--resume): how this session runs, not what it computes
SESSION_OPTIONS = frozenset(
    {
        "resume",
        "stop_after",
        "data",
        "download",
        "workers",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "compile",
        "compile_mode",
        "sdpa_backend",
        "grad_checkpointing",
        "skip_verify",
    }
)


@dataclass
class TrainConfig:
    """A training run's every option (`crate train --NAME`); it checks itself when built: a
    ConfigError names the option that cannot work, alone or with the others."""

    preset: str = "fashion-mnist"  # a named recipe (crate/train/presets.py); the options given override it
    model: str = "crate_mini_patch7_28"  # any timm model name (crate_*, crate_alpha_*: `import crate`)
    finetune: str | None = None  # weights to start from, classifier anew (crate/weights/sources.py)
    freeze: bool = False  # train the classifier alone (a linear probe); every other tensor stays as loaded
    layer_decay: float = 0.0  # layer-wise lr decay through timm's parameter groups (0: off; e.g. 0.75)
    # fashion-mnist, digits (scikit-learn's, 28×28), imagenet (a folder with train/ and val/), folder,
    # torch/cifar10, torch/cifar100, hfds/<name>, wds/<name>, ..., torchvision/flowers102,
    # torchvision/oxford_iiit_pet (crate.data.open_split)
    dataset: str = "fashion-mnist"
    data: str | None = None  # dataset folder (fashion-mnist: crate.data's default; named ones: data/<name>)
    download: bool = False  # fetch a named dataset into --data when missing (never without this flag)
    train_split: str = "train"  # the split trained on (named datasets)
    val_split: str = "validation"  # the split evaluated on (built-in datasets: their test split)
    labels_per_class: int = 0  # digits: k training labels per class, drawn with the seed (0: all)
    num_classes: int = 0  # the class count, for datasets that do not declare theirs (0: the dataset's)
    # image channels the model takes; 0: the dataset's (1 for Fashion-MNIST); fine-tuning adapts the
    # loaded first layer as timm does
    in_chans: int = 0
    eval_crop_pct: float = 0.0  # evaluation resize/crop ratio (0: the model's, e.g. 0.875: 256 -> 224)
    eval_crop_mode: str = "center"  # timm's crop_mode: "center", or "squash" (resize without cropping)
    output: str = "runs/fashion-mnist"  # run folder: config.json, metrics.jsonl, checkpoints
    epochs: int = 10  # passes over the training set (--max-steps may plan fewer steps)
    batch_size: int = 128  # images per optimizer step, over all processes
    # peak learning rate at --lr-batch; scaled linearly to --batch-size (MAE's "base lr" rule: --preset
    # mae gives blr 1.5e-4 at --lr-batch 256, lr = blr × batch / 256)
    lr: float = 2e-3
    lr_batch: int = 128  # the global batch --lr is given for
    min_lr: float = 1e-5  # where the cosine schedule ends
    warmup_epochs: float = 1.0  # linear warm-up from lr/1000, in epochs (shortened with --max-steps)
    weight_decay: float = 0.05  # timm's: not on biases, norms or the model's no_weight_decay()
    opt: str = "adamw"  # timm optimizer name: adamw, lion, ...
    opt_betas: str | None = None  # "beta1,beta2", e.g. "0.9,0.95" (None or "": the optimizer's default)
    label_smoothing: float = 0.1  # of the cross-entropy targets
    mixup: float = 0.0  # Mixup alpha (0: off)
    cutmix: float = 0.0  # CutMix alpha (0: off)
    # timm policy string, e.g. "rand-m9-mstd0.5-inc1", or "tv-rand-n2-m14" for torchvision's RandAugment
    # (the official fine-tuning's); image datasets only
    auto_augment: str | None = None
    reprob: float = 0.0  # random erasing probability (image datasets only)
    color_jitter: float = 0.0  # brightness/contrast/saturation jitter without RandAugment (timm: 0.4)
    hflip: float = 0.5  # horizontal flip probability
    # "min,max": the random-resized crop's range of image area (image datasets; None: timm's 0.08,1)
    crop_scale: str | None = None
    random_shift: int = 0  # Fashion-MNIST: random translation by up to this many pixels
    # masked autoencoders (crate_mae_*): the fraction of patches masked in training and evaluation
    # (0: the model's own, 0.75)
    mask_ratio: float = 0.0
    ema_decay: float = 0.0  # model EMA decay (0: off)
    drop_path: float = 0.0  # stochastic depth rate (0: off)
    grad_clip: float = 0.0  # max gradient norm (0: off)
    accum_steps: int = 1  # gradient accumulation: micro-batches per optimizer step
    amp: bool = True  # bf16 autocast on GPU, and on CPUs with native bf16 (avx512_bf16 / amx_bf16)
    # torch.compile the training step: the model's forward and loss in one region, the backward through
    # AOTAutograd, a fused optimizer where it has one (crate/train/compiled.py); None: on CUDA, off on CPU
    compile: bool | None = None
    # torch.compile's mode: default, reduce-overhead (CUDA graphs), max-autotune-no-cudagraphs, max-autotune
    compile_mode: str = "default"
    # the SDPA kernel of MSSA's attention: auto (PyTorch's choice), cudnn, flash, efficient or math (CUDA)
    sdpa_backend: str = "auto"
    skip_verify: bool = False  # train without the gate (crate/verify; exit 70 when it fails), recorded
    grad_checkpointing: bool = False  # recompute each layer's activations in the backward: less memory
    workers: int = 0  # data-loading processes per rank (0: in the training process)
    # where training images are decoded and augmented: "cpu" (the loader workers, PIL and timm) or "gpu"
    # (workers read the files' bytes; the batch is decoded with nvjpeg and augmented on the run's device
    # with the same random draws; image folders only; a transform step it does not reproduce is
    # refused; evaluation stays on the cpu pipeline). Not a session option: the pixels differ
    # within interpolation rounding, so a run continues with the pipeline it started with
    data_pipeline: str = "cpu"
    seed: int = 0  # of the initialisation, the data order and every augmentation
    checkpoint_every: int = 500  # optimizer steps between checkpoints (and one at each epoch end)
    keep_checkpoints: int = 2  # the newest ones kept
    telemetry_batch: int = 64  # fixed evaluation images for the per-layer white-box telemetry (0: none)
    eval_every: int = 1  # epochs between evaluations (and epoch-end checkpoints); the last step always
    train_subset: int = 0  # use only the first n training images (0: all)
    eval_subset: int = 0  # evaluate only the first n images (0: all)
    max_steps: int = 0  # plan the run, schedule included, for at most this many optimizer steps (0: all)
    stop_after: int = 0  # end this session after this step, checkpointed (--resume continues; 0: at the end)
    max_nonfinite_steps: int = 10  # skipped steps (NaN/inf loss or gradient) in a row before the run stops
    resume: bool = False  # continue the run in --output with its config.json, from its newest checkpoint
    log_every: int = 20  # optimizer steps between metrics.jsonl records

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ConfigError(f"--preset {self.preset!r} is unknown; choose from {sorted(PRESETS)}")
        if not timm.is_model(self.model):
            raise ConfigError(
                f"--model {self.model!r} is not a timm model "
                "(crate_*, crate_alpha_* or a name timm.list_models() gives)"
            )
        if self.opt.lower().split("_")[-1] not in timm.optim.list_optimizers():
            raise ConfigError(f"--opt {self.opt!r} is not a timm optimizer (adamw, lion, sgd, ...)")
        for name in (
            "lr",
            "lr_batch",
            "batch_size",
            "epochs",
            "accum_steps",
            "checkpoint_every",
            "log_every",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "stop_after"):
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be 0 (off) or positive, got {getattr(self, name)}"
                )
        if self.max_nonfinite_steps < 1 or self.keep_checkpoints < 1:
            raise ConfigError("--max-nonfinite-steps and --keep-checkpoints must be at least 1")
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if self.batch_size % (world_size * self.accum_steps):
            raise ConfigError(
                f"--batch-size {self.batch_size} (global) must be divisible by world size × --accum-steps "
                f"({world_size} × {self.accum_steps})"
            )
        self.betas  # noqa: B018  (parsed, so that a malformed value fails here, not at the first step)
        self.scale  # noqa: B018
        if not 0 <= self.mask_ratio < 1:
            raise ConfigError(f"--mask-ratio must be in (0, 1) (0: the model's own), got {self.mask_ratio}")
        if self.freeze and not self.finetune:
            raise ConfigError(
                "--freeze trains only the classifier on top of trained weights: add --finetune SOURCE "
                "(or leave out --freeze to train every parameter)"
            )
        if not 0 <= self.layer_decay < 1:
            raise ConfigError(f"--layer-decay must be in [0, 1) (0: off; e.g. 0.75), got {self.layer_decay}")
        if self.eval_every < 1:
            raise ConfigError(
                f"--eval-every must be >= 1 (epochs between evaluations), got {self.eval_every}"
            )
        if self.compile_mode not in MODES:
            raise ConfigError(f"--compile-mode must be one of {', '.join(MODES)}, got {self.compile_mode!r}")
        if self.sdpa_backend not in ("auto", *SDPA_BACKENDS):
            raise ConfigError(
                f"--sdpa-backend must be auto or one of {', '.join(SDPA_BACKENDS)}, got {self.sdpa_backend!r}"
            )
        if self.data_pipeline not in ("cpu", "gpu"):
            raise ConfigError(f"--data-pipeline must be cpu or gpu, got {self.data_pipeline!r}")
        if self.data_pipeline == "gpu" and self.dataset not in ("imagenet", "folder"):
            raise ConfigError(
                "--data-pipeline gpu reads image files (--dataset imagenet or folder), "
                f"not {self.dataset!r}: use --data-pipeline cpu"
            )
        if self.eval_crop_mode not in ("center", "squash", "border"):
            raise ConfigError(
                f"--eval-crop-mode must be center, squash or border, got {self.eval_crop_mode!r}"
            )

    @property
    def betas(self) -> tuple[float, float] | None:
        """--opt-betas "beta1,beta2" as a tuple, None for the optimizer's default."""
        if self.opt_betas is None or not self.opt_betas.strip():
            return None
        expected = 'two comma-separated numbers in [0, 1), e.g. "0.9,0.95"'
        try:
            betas = tuple(float(value) for value in self.opt_betas.split(","))
        except ValueError:
            raise ConfigError(f"--opt-betas must be {expected}, got {self.opt_betas!r}") from None
        if len(betas) != 2 or not all(0 <= beta < 1 for beta in betas):
            raise ConfigError(f"--opt-betas must be {expected}, got {self.opt_betas!r}")
        return betas

    @property
    def scale(self) -> tuple[float, float] | None:
        """--crop-scale "min,max" as a tuple, None for timm's default."""
        if self.crop_scale is None or not self.crop_scale.strip():
            return None
        expected = 'two comma-separated numbers, 0 < min <= max <= 1, e.g. "0.2,1"'
        try:
            scale = tuple(float(value) for value in self.crop_scale.split(","))
        except ValueError:
            raise ConfigError(f"--crop-scale must be {expected}, got {self.crop_scale!r}") from None
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ConfigError(f"--crop-scale must be {expected}, got {self.crop_scale!r}")
        return scale


def option_help() -> dict[str, str]:
    """Each option's description: its field's comment in TrainConfig, trailing or on the lines above."""
    descriptions, above = {}, []
    for line in inspect.getsource(TrainConfig).splitlines():
        if line.strip().startswith("#"):
            above.append(line.strip().lstrip("# "))
            continue
        field = re.match(r"    (\w+): [^=]+= .*?(?:  # (.*))?$", line)
        if field:
            descriptions[field[1]] = " ".join([*above, *filter(None, [field[2]])])
        above = []
    return descriptions
