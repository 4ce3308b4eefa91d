"""timm registry entries of the black-box baselines the demo compares CRATE with, in the timm module
`baselines` (apart from the CRATE models of module `crate`)."""

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .crate import default_cfg

default_cfgs = generate_default_cfgs({"vit_mini_patch4_28": default_cfg("crate_mini_patch4_28")})


@register_model
def vit_mini_patch4_28(pretrained: bool = False, **kwargs):
    """timm's VisionTransformer with crate_mini_patch4_28's width, depth, heads and patches (MLP ratio
    4): the black-box baseline of the Fashion-MNIST demo."""
    from timm.models.vision_transformer import VisionTransformer

    model_args = dict(
        img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=128, depth=6, num_heads=4
    )
    return build_model_with_cfg(VisionTransformer, "vit_mini_patch4_28", pretrained, **(model_args | kwargs))
