"""What a run minimises and how it is evaluated, chosen by its model: a classifier learns its labels
(cross-entropy, after Mixup/CutMix when on); a masked autoencoder (CRATEMAE) reconstructs its masked
patches and computes that loss itself: ``model(images)`` -> (loss, pred, mask), no labels used."""

import functools
from dataclasses import dataclass

import timm
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.models import split_model_name_tag

from ..evaluate import measure, measure_reconstruction
from ..models.mae import CRATEMAE
from .config import ConfigError, TrainConfig

# what a masked autoencoder cannot use: the labels' options, and the classifier's
UNUSED_BY_AUTOENCODERS = {
    "mixup": 0.0,
    "cutmix": 0.0,
    "label_smoothing": 0.0,
    "freeze": False,
    "layer_decay": 0.0,
}


@functools.cache
def is_masked_autoencoder(model_name: str) -> bool:
    """Whether timm's ``model_name`` builds a CRATEMAE (built on the meta device: no memory, no init);
    False for a name timm does not know (TrainConfig refuses it)."""
    if not timm.is_model(split_model_name_tag(model_name)[0]):
        return False
    with torch.device("meta"):
        return isinstance(timm.create_model(split_model_name_tag(model_name)[0]), CRATEMAE)


def check_options(config: TrainConfig, given: dict, preset: dict) -> dict:
    """The values to replace: a ConfigError names each option an autoencoder cannot use that the command
    line (``given``) or the preset sets, or --mask-ratio given to a classifier; what neither set is made
    neutral (a classifier under --preset mae masks nothing), so that config.json says what the run did."""
    if not is_masked_autoencoder(config.model):
        if given.get("mask_ratio"):
            raise ConfigError(f"--mask-ratio is for masked autoencoders (crate_mae_*), not {config.model}")
        return dict(mask_ratio=0.0)
    chosen = preset | given
    refused = [
        f"--{name.replace('_', '-')} {chosen[name]}"
        + ("" if name in given else f" (--preset {config.preset})")
        for name, neutral in UNUSED_BY_AUTOENCODERS.items()
        if name in chosen and chosen[name] != neutral
    ]
    if refused:
        raise ConfigError(
            f"{config.model} is a masked autoencoder (no labels, no classifier): it cannot use "
            f"{', '.join(refused)}; leave them out (--preset mae is its recipe)"
        )
    return UNUSED_BY_AUTOENCODERS


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


class OwnLoss(torch.nn.Module):
    """The loss a masked autoencoder returns first, (loss, pred, mask); the labels are not used."""

    def forward(self, output: tuple, targets: torch.Tensor) -> torch.Tensor:
        return output[0]


@dataclass
class Classification:
    mixup: Mixup | None
    criterion: torch.nn.Module  # (logits, targets) -> loss

    def measure(self, model, loader, device, autocast) -> dict:
        return measure(model, loader, device, autocast)

    @staticmethod
    def describe(model: torch.nn.Module) -> str:
        return f"{model.num_classes} classes"

    @staticmethod
    def summary(result: dict) -> str:
        return (
            f"epoch {result['epoch']:.2f}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
            f"eval loss {result['eval_loss']:.4f}  ({result['train_time_s']:.0f} s)"
        )


@dataclass
class Reconstruction:
    seed: int  # of the evaluation's masking: every evaluation of the run masks the same patches
    mixup = None
    criterion = OwnLoss()

    def measure(self, model, loader, device, autocast) -> dict:
        return measure_reconstruction(model, loader, device, autocast, self.seed)

    @staticmethod
    def describe(model: CRATEMAE) -> str:
        return f"masked autoencoder, mask ratio {model.config.mask_ratio}"

    @staticmethod
    def summary(result: dict) -> str:
        return (
            f"epoch {result['epoch']:.2f}: masked-patch reconstruction MSE {result['eval_loss']:.4f}  "
            f"({result['train_time_s']:.0f} s)"
        )


def make_objective(config: TrainConfig, model: torch.nn.Module) -> Classification | Reconstruction:
    """The run's objective: its model's."""
    if isinstance(model, CRATEMAE):
        return Reconstruction(config.seed)
    return Classification(*make_loss(config, model.num_classes))
