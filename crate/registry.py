"""timm registry entries for every CRATE configuration: `timm.create_model("crate_tiny_patch16_224")`.

Imported by `import crate` when timm is installed. Checkpoints in the official layout load through
timm's pretrained machinery (e.g. `pretrained_cfg_overlay=dict(file="crate_tiny.pth")`), converted by
`convert_official_state_dict`.
"""

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .model import CRATE, VARIANTS, convert_official_state_dict, default_cfg, variant_config

default_cfgs = generate_default_cfgs(
    {name: default_cfg(name) for name in VARIANTS}
    | {"vit_mini_patch4_28": default_cfg("crate_mini_patch4_28")}
)


def _create_crate(variant: str, pretrained: bool = False, **kwargs) -> CRATE:
    return build_model_with_cfg(
        CRATE,
        variant,
        pretrained,
        pretrained_filter_fn=convert_official_state_dict,
        feature_cfg=dict(feature_cls="getter"),
        config=variant_config(variant),
        **kwargs,
    )


@register_model
def crate_tiny_patch16_224(pretrained: bool = False, **kwargs) -> CRATE:
    """CRATE-T: d=384, 12 layers, 6 heads; 6,090,856 parameters."""
    return _create_crate("crate_tiny_patch16_224", pretrained, **kwargs)


@register_model
def crate_small_patch16_224(pretrained: bool = False, **kwargs) -> CRATE:
    """CRATE-S: d=576, 12 layers, 12 heads; 13,116,328 parameters."""
    return _create_crate("crate_small_patch16_224", pretrained, **kwargs)


@register_model
def crate_base_patch16_224(pretrained: bool = False, **kwargs) -> CRATE:
    """CRATE-B: d=768, 12 layers, 12 heads; 22,796,008 parameters."""
    return _create_crate("crate_base_patch16_224", pretrained, **kwargs)


@register_model
def crate_large_patch16_224(pretrained: bool = False, **kwargs) -> CRATE:
    """CRATE-L: d=1024, 24 layers, 16 heads; 77,641,192 parameters."""
    return _create_crate("crate_large_patch16_224", pretrained, **kwargs)


@register_model
def crate_small_patch8_224(pretrained: bool = False, **kwargs) -> CRATE:
    """CRATE-S with 8×8 patches (784 patches), for attention maps and segmentation."""
    return _create_crate("crate_small_patch8_224", pretrained, **kwargs)


@register_model
def crate_base_patch8_224(pretrained: bool = False, **kwargs) -> CRATE:
    """CRATE-B with 8×8 patches (784 patches), for attention maps and segmentation."""
    return _create_crate("crate_base_patch8_224", pretrained, **kwargs)


@register_model
def crate_mini_patch4_28(pretrained: bool = False, **kwargs) -> CRATE:
    """A small CRATE for 28×28 grayscale images (Fashion-MNIST): d=128, 6 layers, 4 heads."""
    return _create_crate("crate_mini_patch4_28", pretrained, **kwargs)


@register_model
def vit_mini_patch4_28(pretrained: bool = False, **kwargs):
    """timm's VisionTransformer with crate_mini_patch4_28's width, depth, heads and patches (MLP ratio
    4): the black-box baseline of the Fashion-MNIST demo."""
    from timm.models.vision_transformer import VisionTransformer

    model_args = dict(
        img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=128, depth=6, num_heads=4
    )
    return build_model_with_cfg(VisionTransformer, "vit_mini_patch4_28", pretrained, **(model_args | kwargs))
