"""timm registry entries for every CRATE and CRATE-α configuration, in the timm module `crate`:
`timm.create_model("crate_tiny_patch16_224")`,
`timm.create_model("crate_alpha_base_patch16_224", pretrained=True)`, `timm.list_models(module="crate")`
(timm names a model's module after the last component of its entry function's module).

Imported by `import crate` when timm is installed. Checkpoints in the released layouts load through
timm's pretrained machinery, converted by `convert_official_state_dict`: CRATE-α's published weights
from the Hugging Face Hub (UCSC-VLAA/CRATE-alpha), any local file with
`pretrained_cfg_overlay=dict(file="crate_tiny.pth")`.
"""

from pathlib import PurePosixPath

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg

from ..errors import MissingError
from .alpha import ALPHA_VARIANTS, HUB_ID, IN21K_CLASSES, IN21K_FOLDER, PRETRAINED, CRATEAlpha
from .hub import hub_cache, hub_unreachable, require_hub_weights
from .model import CRATE, IMAGENET_MEAN, IMAGENET_STD, VARIANTS
from .released import convert_official_state_dict

FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)  # the 28×28 grayscale models' inputs
PAPERS = {
    CRATE: dict(
        license="mit",
        paper_ids="arXiv:2306.01129",
        paper_name="White-Box Transformers via Sparse Rate Reduction",
    ),
    CRATEAlpha: dict(
        license="apache-2.0",
        paper_ids="arXiv:2405.20299",
        paper_name="Scaling White-Box Transformers for Vision",
    ),
}
# name: (the model class, its configuration's keywords), both families
MODELS = {name: (CRATE, config) for name, config in VARIANTS.items()} | {
    name: (CRATEAlpha, config) for name, config in ALPHA_VARIANTS.items()
}


def default_cfg(name: str) -> dict:
    """timm's default cfg of a variant: its input, the mean and std of ImageNet (RGB) or of
    Fashion-MNIST (grayscale), evaluation at crop 0.875 for 224² inputs (resize 256, centre crop)."""
    model_class, config = MODELS[name]
    input_size = (config["in_chans"], *config["img_size"])
    rgb = config["in_chans"] == 3
    return dict(
        num_classes=config["num_classes"],
        input_size=input_size,
        fixed_input_size=True,
        pool_size=None,
        crop_pct=0.875 if input_size[-1] == 224 else 1.0,
        interpolation="bilinear",
        mean=IMAGENET_MEAN if rgb else FASHION_MNIST_MEAN,
        std=IMAGENET_STD if rgb else FASHION_MNIST_STD,
        first_conv="patch_embed.proj",
        classifier="head",
        **PAPERS[model_class],
    )


def _tagged_cfgs(name: str) -> dict[str, dict]:
    """ "name.tag" for each published file of a variant, else "name" alone."""
    tags = PRETRAINED.get(name)
    if not tags:
        return {name: default_cfg(name)}
    return {
        f"{name}.{tag}": default_cfg(name)
        | dict(hf_hub_id=HUB_ID, hf_hub_filename=file)
        | (dict(num_classes=IN21K_CLASSES) if tag == "in21k" else {})
        for tag, file in tags.items()
    }


default_cfgs = generate_default_cfgs({key: cfg for name in MODELS for key, cfg in _tagged_cfgs(name).items()})


def _create(variant: str, pretrained: bool = False, **kwargs):
    model_class, config = MODELS[variant]
    if pretrained and model_class is CRATEAlpha:
        kwargs = _with_hub_file(variant, kwargs)
        cfg = resolve_pretrained_cfg(
            variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay")
        )
        require_hub_weights(f"{variant}.{cfg.tag}", cfg)
    return build_model_with_cfg(
        model_class,
        variant,
        pretrained,
        pretrained_filter_fn=convert_official_state_dict,
        feature_cfg=_feature_cfg(kwargs),
        config=model_class.config_class(**config),
        **_with_input_channels(variant, kwargs),
    )


def _with_input_channels(variant: str, kwargs: dict) -> dict:
    """A model built with another in_chans than its variant's: its pretrained cfg (timm's data config)
    says that many channels, with per channel the mean of the variant's means and stds (timm's
    resolve_input_data_config's rule), so that resolve_data_config(model=model) gives images it reads;
    and timm does not adapt the first layer a second time (convert_official_state_dict did)."""
    channels = kwargs.get("in_chans")
    cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
    if channels is None or cfg.input_size[0] == channels:
        return kwargs
    mean, std = (sum(values) / len(values) for values in (cfg.mean, cfg.std))
    overlay = dict(
        kwargs.get("pretrained_cfg_overlay") or {},
        input_size=(channels, *cfg.input_size[1:]),
        mean=(mean,) * channels,
        std=(std,) * channels,
    )
    return kwargs | dict(pretrained_cfg_overlay=overlay)


def _feature_cfg(kwargs: dict) -> dict:
    """features_only by forward_intermediates, of the last 3 layers unless out_indices says (as timm ViTs)."""
    return dict(feature_cls="getter", out_indices=kwargs.pop("out_indices", 3))


@register_model
def crate_tiny_patch16_224(pretrained: bool = False, **kwargs) -> CRATE:
    """CRATE-T: d=384, 12 layers, 6 heads; 6,090,856 parameters."""
    return _create("crate_tiny_patch16_224", pretrained, **kwargs)


@register_model
def crate_small_patch16_224(pretrained: bool = False, **kwargs) -> CRATE:
    """CRATE-S: d=576, 12 layers, 12 heads; 13,116,328 parameters."""
    return _create("crate_small_patch16_224", pretrained, **kwargs)


@register_model
def crate_base_patch16_224(pretrained: bool = False, **kwargs) -> CRATE:
    """CRATE-B: d=768, 12 layers, 12 heads; 22,796,008 parameters."""
    return _create("crate_base_patch16_224", pretrained, **kwargs)


@register_model
def crate_large_patch16_224(pretrained: bool = False, **kwargs) -> CRATE:
    """CRATE-L: d=1024, 24 layers, 16 heads; 77,641,192 parameters."""
    return _create("crate_large_patch16_224", pretrained, **kwargs)


@register_model
def crate_small_patch8_224(pretrained: bool = False, **kwargs) -> CRATE:
    """CRATE-S with 8×8 patches (784 patches), for attention maps and segmentation."""
    return _create("crate_small_patch8_224", pretrained, **kwargs)


@register_model
def crate_base_patch8_224(pretrained: bool = False, **kwargs) -> CRATE:
    """CRATE-B with 8×8 patches (784 patches), for attention maps and segmentation."""
    return _create("crate_base_patch8_224", pretrained, **kwargs)


@register_model
def crate_mini_patch4_28(pretrained: bool = False, **kwargs) -> CRATE:
    """A small CRATE for 28×28 grayscale images (Fashion-MNIST): d=128, 6 layers, 4 heads."""
    return _create("crate_mini_patch4_28", pretrained, **kwargs)


@register_model
def crate_mini_patch7_28(pretrained: bool = False, **kwargs) -> CRATE:
    """crate_mini_patch4_28 with 7×7 patches (16 instead of 49) and the mean token read out: the CPU
    demo's model."""
    return _create("crate_mini_patch7_28", pretrained, **kwargs)


def _with_hub_file(variant: str, kwargs: dict) -> dict:
    """The ImageNet-21K files have long run names in the Hub folder torch/in21k_Pretrain/: find the
    one of this variant (e.g. "B16_…" for base, patch 16) in the Hub's listing, or in the local
    Hugging Face cache when offline (HF_HUB_OFFLINE=1), and name it in the pretrained cfg."""
    cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
    if cfg.file or cfg.state_dict or cfg.hf_hub_filename or cfg.hf_hub_id != HUB_ID:
        return kwargs
    config = ALPHA_VARIANTS[variant]
    patch, size = config["patch_size"], {768: "B", 1024: "L"}[config["dim"]]
    prefix = f"{size}{patch}_"
    listing, source = _hub_listing()
    candidates = sorted(
        path
        for path in listing
        if path.startswith(IN21K_FOLDER)
        and PurePosixPath(path).name.startswith(prefix)
        and path.endswith(".pth")
    )
    if len(candidates) != 1:
        raise MissingError(
            f"{variant}.{cfg.tag}: expected one file {IN21K_FOLDER}{prefix}*.pth in {HUB_ID} ({source}), "
            f"found {candidates or 'none'}; name it with "
            "pretrained_cfg_overlay=dict(hf_hub_filename=...) or load a local copy with "
            "pretrained_cfg_overlay=dict(file=...)"
        )
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {}, hf_hub_filename=candidates[0])
    return kwargs | dict(pretrained_cfg_overlay=overlay)


def _hub_listing() -> tuple[list[str], str]:
    """(files of the Hub repository, where the list came from): the Hub, else the local cache."""
    import huggingface_hub

    reason = hub_unreachable()
    if reason is None:
        try:
            return huggingface_hub.list_repo_files(HUB_ID), "the Hub's listing"
        except Exception as error:  # offline, no network, or the Hub unreachable: fall back to the cache
            failure = f"{type(error).__name__}: {error}".splitlines()[0]
            reason = f"the Hub could not be listed ({failure})"
    cache = hub_cache()
    if not cache.is_dir():  # a machine that never downloaded anything (scan_cache_dir: CacheNotFound)
        return [], f"the local Hugging Face cache {cache} does not exist, and {reason}"
    files = [
        file.file_path.relative_to(revision.snapshot_path).as_posix()
        for repo in huggingface_hub.scan_cache_dir(cache).repos
        if repo.repo_id == HUB_ID and repo.repo_type == "model"
        for revision in repo.revisions
        for file in revision.files
    ]
    return files, f"the local Hugging Face cache {cache}, since {reason}"


@register_model
def crate_alpha_tiny_patch16_224(pretrained: bool = False, **kwargs) -> CRATEAlpha:
    """CRATE-α-Ti/16: d=192, 12 layers, 3 heads (no published weights)."""
    return _create("crate_alpha_tiny_patch16_224", pretrained, **kwargs)


@register_model
def crate_alpha_small_patch16_224(pretrained: bool = False, **kwargs) -> CRATEAlpha:
    """CRATE-α-S/16: d=576, 12 layers, 12 heads (no published weights)."""
    return _create("crate_alpha_small_patch16_224", pretrained, **kwargs)


@register_model
def crate_alpha_base_patch32_224(pretrained: bool = False, **kwargs) -> CRATEAlpha:
    """CRATE-α-B/32: d=768, 12 layers, 12 heads; ImageNet-21K weights (.in21k)."""
    return _create("crate_alpha_base_patch32_224", pretrained, **kwargs)


@register_model
def crate_alpha_base_patch16_224(pretrained: bool = False, **kwargs) -> CRATEAlpha:
    """CRATE-α-B/16: d=768, 12 layers, 12 heads; 72,328,936 parameters. Published weights: ImageNet-21K
    pre-trained and ImageNet-1K fine-tuned (.in21k_ft_in1k, the default: 81.2% top-1), and .in21k."""
    return _create("crate_alpha_base_patch16_224", pretrained, **kwargs)


@register_model
def crate_alpha_base_patch8_224(pretrained: bool = False, **kwargs) -> CRATEAlpha:
    """CRATE-α-B/8: d=768, 12 layers, 12 heads, 784 patches; ImageNet-21K weights (.in21k)."""
    return _create("crate_alpha_base_patch8_224", pretrained, **kwargs)


@register_model
def crate_alpha_large_patch32_224(pretrained: bool = False, **kwargs) -> CRATEAlpha:
    """CRATE-α-L/32: d=1024, 24 layers, 16 heads; ImageNet-21K weights (.in21k)."""
    return _create("crate_alpha_large_patch32_224", pretrained, **kwargs)


@register_model
def crate_alpha_large_patch14_224(pretrained: bool = False, **kwargs) -> CRATEAlpha:
    """CRATE-α-L/14: d=1024, 24 layers, 16 heads; 253,650,920 parameters. Published weights:
    .in21k_ft_in1k (the default: 83.9% top-1) and .in21k."""
    return _create("crate_alpha_large_patch14_224", pretrained, **kwargs)


@register_model
def crate_alpha_large_patch8_224(pretrained: bool = False, **kwargs) -> CRATEAlpha:
    """CRATE-α-L/8: d=1024, 24 layers, 16 heads, 784 patches; ImageNet-21K weights (.in21k)."""
    return _create("crate_alpha_large_patch8_224", pretrained, **kwargs)


@register_model
def crate_alpha_huge_patch14_224(pretrained: bool = False, **kwargs) -> CRATEAlpha:
    """CRATE-α-H/14: d=1280, 32 layers, 16 heads (no published classifier weights)."""
    return _create("crate_alpha_huge_patch14_224", pretrained, **kwargs)


@register_model
def crate_alpha_mini_patch4_28(pretrained: bool = False, **kwargs) -> CRATEAlpha:
    """A small CRATE-α for 28×28 grayscale images (Fashion-MNIST): d=128, 6 layers, 4 heads, 512 atoms."""
    return _create("crate_alpha_mini_patch4_28", pretrained, **kwargs)
