"""CRATE-α, the fast model: the scaled-up white-box transformer (Yang et al., "Scaling White-Box
Transformers for Vision", NeurIPS 2024).

Exactly the released PyTorch port (UCSC-VLAA/CRATE-alpha, `torch_inference/model/crate_alpha.py`), the
layout of the published weights; docs/crate-alpha.md states it and derives its sparse coding block.
What changes from CRATE (crate/model.py), whose model contract this one inherits:
- the sparse coding block is ODL, two non-negative ISTA steps from a zero start on the LASSO with an
  over-complete dictionary D ∈ R^{d×4d}, decoded by a second dictionary D₁, with a residual;
- the patch embedding is a Conv2d with bias (no LayerNorms);
- the blocks' LayerNorms have eps 1e-6 (the head's keeps 1e-5), and W_out has no bias.
verification/test_fast_model.py (its "-alpha" cases) proves it equal to the float64
`reference.OfficialCRATEAlpha`.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .model import (
    CRATE,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MSSA,
    CRATEConfig,
    DropPath,
    _config_from,
    _pair,
)

LAYERNORM_EPS = 1e-6  # the released blocks'; the head's LayerNorm keeps PyTorch's default 1e-5


class ConvPatchEmbed(nn.Module):
    """P×P patches by a Conv2d (kernel = stride = P, with bias), tokens row-major over the grid."""

    def __init__(self, img_size: tuple[int, int], patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)  # (B, d, h, w) -> (B, n, d)


class ODL(nn.Module):
    """Over-complete dictionary learning: two non-negative ISTA steps from a = 0 on
    ½‖u − Da‖² + λ‖a‖₁ + 𝟙{a ≥ 0}, then the decoder D₁. Token-major, per token u (1 × d):

        a₁ = ReLU(η·uD − ηλ),  a₂ = ReLU(a₁ − η(a₁Dᵀ − u)D − ηλ),  output a₂D₁ᵀ.

    Measured (benchmarks/test_throughput.py::test_odl_forms): these token matmuls beat the Gram form
    a₁(ηDᵀD), whose 4d × 4d Gram costs twice the token FLOPs of the two products it replaces. The
    codes a₁ stay outside the products, which keeps bf16 accurate.
    """

    def __init__(self, dim: int, ratio: int = 4, eta: float = 0.1, lam: float = 0.1):
        super().__init__()
        self.eta, self.lam = eta, lam
        self.D = nn.Parameter(torch.empty(dim, ratio * dim))  # encoder
        self.D1 = nn.Parameter(torch.empty(dim, ratio * dim))  # decoder
        nn.init.kaiming_uniform_(self.D)  # the released init: U(±√(6/(ratio·d)))
        nn.init.kaiming_uniform_(self.D1)

    def codes(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a₁, a₂), each (B, N, ratio·d)."""
        threshold = self.eta * self.lam
        a1 = F.relu(self.eta * (u @ self.D) - threshold)
        a2 = F.relu(a1 - self.eta * ((a1 @ self.D.T - u) @ self.D) - threshold)
        return a1, a2

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.codes(u)[1] @ self.D1.T  # (B, N, d)


class AlphaBlock(nn.Module):
    """One CRATE-α layer: Z^{ℓ+½} = Z^ℓ + MSSA(LN₁(Z^ℓ)), then Z^{ℓ+1} = Z^{ℓ+½} + ODL(LN₂(Z^{ℓ+½})).
    Both branches are residual, so drop-path acts on both."""

    def __init__(self, dim, heads, head_dim, ratio, eta, lam, proj_drop=0.0, drop_path=0.0, fused_attn=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        self.attn = MSSA(dim, heads, head_dim, proj_drop, fused_attn, proj_bias=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        self.odl = ODL(dim, ratio, eta, lam)

    def compress(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.attn(self.norm1(x)))

    def sparsify(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.drop_path(self.odl(self.norm2(z)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sparsify(self.compress(x))


@dataclass(frozen=True)
class CRATEAlphaConfig(CRATEConfig):
    dim: int = 768  # defaults: CRATE-α-B/16
    heads: int = 12
    dictionary_ratio: int = 4  # D and D₁ are d × ratio·d (the released models: 4)

    def __post_init__(self):
        super().__post_init__()
        if self.dictionary_ratio < 1:
            raise ValueError(
                f"invalid CRATE configuration: dictionary_ratio must be >= 1, got {self.dictionary_ratio}"
            )


class CRATEAlpha(CRATE):
    """CRATE-α classifier with timm's model contract (inherited from CRATE). Build it from a
    CRATEAlphaConfig and/or keyword overrides, or with timm.create_model("crate_alpha_...")."""

    config_class = CRATEAlphaConfig

    @staticmethod
    def make_patch_embed(config: CRATEAlphaConfig) -> nn.Module:
        return ConvPatchEmbed(_pair(config.img_size), config.patch_size, config.in_chans, config.dim)

    @staticmethod
    def make_block(config: CRATEAlphaConfig, drop_path: float) -> nn.Module:
        heads = config.heads
        return AlphaBlock(
            config.dim,
            heads,
            config.dim // heads,
            config.dictionary_ratio,
            config.eta,
            config.lam,
            config.drop_rate,
            drop_path,
            config.fused_attn,
        )


# -- default cfgs ---------------------------------------------------------------------------------------
HUB_ID = "UCSC-VLAA/CRATE-alpha"  # the published weights (apache-2.0)
IN21K_FOLDER = "torch/in21k_Pretrain/"
IN21K_CLASSES = 19167  # the pre-training's class count (its config and the files' heads)

# name: (patch, dim, depth, heads, input size, classes); sizes of the released JAX code's table
ALPHA_VARIANTS = {
    "crate_alpha_tiny_patch16_224": (16, 192, 12, 3, (3, 224, 224), 1000),
    "crate_alpha_small_patch16_224": (16, 576, 12, 12, (3, 224, 224), 1000),
    "crate_alpha_base_patch32_224": (32, 768, 12, 12, (3, 224, 224), 1000),
    "crate_alpha_base_patch16_224": (16, 768, 12, 12, (3, 224, 224), 1000),
    "crate_alpha_base_patch8_224": (8, 768, 12, 12, (3, 224, 224), 1000),
    "crate_alpha_large_patch32_224": (32, 1024, 24, 16, (3, 224, 224), 1000),
    "crate_alpha_large_patch14_224": (14, 1024, 24, 16, (3, 224, 224), 1000),
    "crate_alpha_large_patch8_224": (8, 1024, 24, 16, (3, 224, 224), 1000),
    "crate_alpha_huge_patch14_224": (14, 1280, 32, 16, (3, 224, 224), 1000),
    "crate_alpha_mini_patch4_28": (4, 128, 6, 4, (1, 28, 28), 10),
}

# variant: {tag: hub file}; None: an ImageNet-21K file found by its prefix in IN21K_FOLDER (see
# crate.crate._with_hub_file), since the folder's long file names are not fixed here
PRETRAINED = {
    "crate_alpha_base_patch16_224": {"in21k_ft_in1k": "torch/crate_alpha_B16.pth", "in21k": None},
    "crate_alpha_large_patch14_224": {"in21k_ft_in1k": "torch/crate_alpha_L14.pth", "in21k": None},
    "crate_alpha_base_patch32_224": {"in21k": None},
    "crate_alpha_base_patch8_224": {"in21k": None},
    "crate_alpha_large_patch32_224": {"in21k": None},
    "crate_alpha_large_patch8_224": {"in21k": None},
}


def alpha_variant_config(name: str, **overrides) -> CRATEAlphaConfig:
    patch, dim, depth, heads, (channels, height, width), classes = ALPHA_VARIANTS[name]
    base = CRATEAlphaConfig(
        img_size=(height, width),
        patch_size=patch,
        in_chans=channels,
        num_classes=classes,
        dim=dim,
        depth=depth,
        heads=heads,
    )
    return _config_from(base, overrides, CRATEAlphaConfig)


def alpha_default_cfgs() -> dict[str, dict]:
    """timm default cfgs, keyed "name.tag" for the published weights and "name" for the others."""
    cfgs = {}
    for name, (_, _, _, _, input_size, classes) in ALPHA_VARIANTS.items():
        base = dict(
            num_classes=classes,
            input_size=input_size,
            fixed_input_size=True,
            pool_size=None,
            crop_pct=0.875 if input_size[-1] == 224 else 1.0,  # evaluation: resize 256, centre crop 224
            interpolation="bilinear",
            mean=IMAGENET_MEAN if input_size[0] == 3 else FASHION_MNIST_MEAN,
            std=IMAGENET_STD if input_size[0] == 3 else FASHION_MNIST_STD,
            first_conv="patch_embed.proj",
            classifier="head",
            license="apache-2.0",
            paper_ids="arXiv:2405.20299",
            paper_name="Scaling White-Box Transformers for Vision",
        )
        tags = PRETRAINED.get(name)
        if not tags:
            cfgs[name] = base
        for tag, file in (tags or {}).items():
            cfgs[f"{name}.{tag}"] = base | dict(
                hf_hub_id=HUB_ID,
                hf_hub_filename=file,
                num_classes=IN21K_CLASSES if tag == "in21k" else classes,
            )
    return cfgs
