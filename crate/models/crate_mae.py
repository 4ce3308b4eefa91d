"""timm registry entries for CRATE-MAE, in the timm module `crate_mae`: the autoencoders
(`timm.create_model("crate_mae_base_patch16_224")`, a CRATEMAE) and their encoders as classifiers
(`crate_mae_encoder_base_patch16_224`, a CRATEMAEEncoder, for linear probes and fine-tuning).

No entry downloads weights: the one published file (CRATE-MAE-B, on a file host, not the Hub) loads
with ``load_released_mae_state_dict(model, torch.load(path, weights_only=True))``.
"""

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ..errors import InvalidError
from .crate import FASHION_MNIST_MEAN, FASHION_MNIST_STD, PAPERS
from .mae import CRATEMAE, MAE_VARIANTS, CRATEMAEConfig, CRATEMAEEncoder
from .model import IMAGENET_MEAN, IMAGENET_STD

PAPER = dict(
    license="mit",
    paper_ids="openreview:PvyOYleymy",
    paper_name="Masked Completion via Structured Diffusion with White-Box Transformers",
)
PAPERS[CRATEMAEEncoder] = PAPER


def _cfg(config: dict, classifier: str | None) -> dict:
    rgb = config["in_chans"] == 3
    return dict(
        num_classes=1000 if rgb else 10,
        input_size=(config["in_chans"], *config["img_size"]),
        fixed_input_size=True,
        crop_pct=0.875 if rgb else 1.0,
        interpolation="bicubic",
        mean=IMAGENET_MEAN if rgb else FASHION_MNIST_MEAN,
        std=IMAGENET_STD if rgb else FASHION_MNIST_STD,
        first_conv="patch_embed.proj",
        classifier=classifier,
        **PAPER,
    )


def _encoder_name(name: str) -> str:
    return name.replace("crate_mae_", "crate_mae_encoder_", 1)


default_cfgs = generate_default_cfgs(
    {name: _cfg(config, None) for name, config in MAE_VARIANTS.items()}
    | {_encoder_name(name): _cfg(config, "head") for name, config in MAE_VARIANTS.items()}
)


def _create(model_class: type, variant: str, pretrained: bool, **kwargs):
    if pretrained:
        raise InvalidError(
            f"{variant} has no weights to download: load the published CRATE-MAE-B file with "
            "crate.models.mae.load_released_mae_state_dict, "
            "or fine-tune from a run (crate train --finetune RUN)"
        )
    config = MAE_VARIANTS[variant.replace("crate_mae_encoder_", "crate_mae_", 1)]
    if model_class is CRATEMAEEncoder:
        kwargs.setdefault("num_classes", 1000 if config["in_chans"] == 3 else 10)
    kwargs.pop("pretrained_cfg_overlay", None)
    return build_model_with_cfg(
        model_class, variant, False, config=CRATEMAEConfig(**config), feature_cfg=None, **kwargs
    )


@register_model
def crate_mae_tiny_patch16_224(pretrained: bool = False, **kwargs) -> CRATEMAE:
    """CRATE-MAE-T/16: d=384, 12 + 12 layers, 6 heads."""
    return _create(CRATEMAE, "crate_mae_tiny_patch16_224", pretrained, **kwargs)


@register_model
def crate_mae_small_patch16_224(pretrained: bool = False, **kwargs) -> CRATEMAE:
    """CRATE-MAE-S/16: d=576, 12 + 12 layers, 12 heads."""
    return _create(CRATEMAE, "crate_mae_small_patch16_224", pretrained, **kwargs)


@register_model
def crate_mae_base_patch16_224(pretrained: bool = False, **kwargs) -> CRATEMAE:
    """CRATE-MAE-B/16: d=768, 12 + 12 layers, 12 heads (the published weights' size)."""
    return _create(CRATEMAE, "crate_mae_base_patch16_224", pretrained, **kwargs)


@register_model
def crate_mae_large_patch16_224(pretrained: bool = False, **kwargs) -> CRATEMAE:
    """CRATE-MAE-L/16: d=1024, 24 + 24 layers, 16 heads."""
    return _create(CRATEMAE, "crate_mae_large_patch16_224", pretrained, **kwargs)


@register_model
def crate_mae_mini_patch4_28(pretrained: bool = False, **kwargs) -> CRATEMAE:
    """The CPU demo's CRATE-MAE for 28×28 grayscale images: d=128, 4 + 4 layers, 4 heads, 4×4 patches."""
    return _create(CRATEMAE, "crate_mae_mini_patch4_28", pretrained, **kwargs)


@register_model
def crate_mae_encoder_tiny_patch16_224(pretrained: bool = False, **kwargs) -> CRATEMAEEncoder:
    """The encoder of CRATE-MAE-T/16 as a classifier."""
    return _create(CRATEMAEEncoder, "crate_mae_encoder_tiny_patch16_224", pretrained, **kwargs)


@register_model
def crate_mae_encoder_small_patch16_224(pretrained: bool = False, **kwargs) -> CRATEMAEEncoder:
    """The encoder of CRATE-MAE-S/16 as a classifier."""
    return _create(CRATEMAEEncoder, "crate_mae_encoder_small_patch16_224", pretrained, **kwargs)


@register_model
def crate_mae_encoder_base_patch16_224(pretrained: bool = False, **kwargs) -> CRATEMAEEncoder:
    """The encoder of CRATE-MAE-B/16 as a classifier."""
    return _create(CRATEMAEEncoder, "crate_mae_encoder_base_patch16_224", pretrained, **kwargs)


@register_model
def crate_mae_encoder_large_patch16_224(pretrained: bool = False, **kwargs) -> CRATEMAEEncoder:
    """The encoder of CRATE-MAE-L/16 as a classifier."""
    return _create(CRATEMAEEncoder, "crate_mae_encoder_large_patch16_224", pretrained, **kwargs)


@register_model
def crate_mae_encoder_mini_patch4_28(pretrained: bool = False, **kwargs) -> CRATEMAEEncoder:
    """The encoder of crate_mae_mini_patch4_28 as a classifier (10 classes)."""
    return _create(CRATEMAEEncoder, "crate_mae_encoder_mini_patch4_28", pretrained, **kwargs)
