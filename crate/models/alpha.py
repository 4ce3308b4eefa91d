"""CRATE-α, the fast model: the scaled-up white-box transformer (Yang et al., "Scaling White-Box
Transformers for Vision", NeurIPS 2024).

Exactly the released PyTorch port (UCSC-VLAA/CRATE-alpha, `torch_inference/model/crate_alpha.py`), the
layout of the published weights; docs/crate-alpha.md states it and derives its sparse coding block.
What changes from CRATE (model.py), whose model contract this one inherits:
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

from ..errors import InvalidError
from .layers import MSSA, DropPath
from .model import CRATE, GRAYSCALE_28, IMAGENET_224, CRATEConfig

BLOCK_NORM_EPS = 1e-6  # the released blocks' LayerNorms; the head's keeps PyTorch's default (NORM_EPS)


class ConvPatchEmbed(nn.Module):
    """P×P patches by a Conv2d (kernel = stride = P, with bias), tokens row-major over the grid."""

    def __init__(
        self,
        img_size: tuple[int, int],
        patch_size: int,
        in_chans: int,
        dim: int,
        strict_img_size: bool = True,
    ):
        super().__init__()
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.strict_img_size = strict_img_size  # the convolution takes any size; the model checks it
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)  # (B, d, h, w) -> (B, n, d)


class ODL(nn.Module):
    """Over-complete dictionary learning: two non-negative ISTA steps from a = 0 on
    ½‖u − Da‖² + λ‖a‖₁ + 𝟙{a ≥ 0}, then the decoder D₁. Token-major, per token u (1 × d):

        a₁ = ReLU(η·uD − ηλ),  a₂ = ReLU(a₁ − η(a₁Dᵀ − u)D − ηλ),  output a₂D₁ᵀ.

    These token matmuls, not the Gram form a₁(ηDᵀD), whose 4d × 4d Gram costs twice the token FLOPs
    of the two products it replaces (benchmarks/test_throughput.py::test_odl_forms times both). The
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

    def __init__(self, config: "CRATEAlphaConfig", drop_path: float = 0.0):
        super().__init__()
        dim, heads = config.dim, config.heads
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.attn = MSSA(dim, heads, dim // heads, config.drop_rate, config.fused_attn, proj_bias=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.odl = ODL(dim, config.dictionary_ratio, config.eta, config.lam)

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
            raise InvalidError(
                f"invalid CRATE configuration: dictionary_ratio must be >= 1, got {self.dictionary_ratio}"
            )


class CRATEAlpha(CRATE):
    """CRATE-α classifier with timm's model contract (inherited from CRATE). Build it from a
    CRATEAlphaConfig and/or keyword overrides, or with timm.create_model("crate_alpha_...")."""

    config_class = CRATEAlphaConfig
    patch_embed_class = ConvPatchEmbed
    block_class = AlphaBlock


# -- variants and published weights: their timm entries are in crate.py ------------------------------
# sizes of the released JAX code's table
ALPHA_VARIANTS = {
    "crate_alpha_tiny_patch16_224": dict(patch_size=16, dim=192, depth=12, heads=3, **IMAGENET_224),
    "crate_alpha_small_patch16_224": dict(patch_size=16, dim=576, depth=12, heads=12, **IMAGENET_224),
    "crate_alpha_base_patch32_224": dict(patch_size=32, dim=768, depth=12, heads=12, **IMAGENET_224),
    "crate_alpha_base_patch16_224": dict(patch_size=16, dim=768, depth=12, heads=12, **IMAGENET_224),
    "crate_alpha_base_patch8_224": dict(patch_size=8, dim=768, depth=12, heads=12, **IMAGENET_224),
    "crate_alpha_large_patch32_224": dict(patch_size=32, dim=1024, depth=24, heads=16, **IMAGENET_224),
    "crate_alpha_large_patch14_224": dict(patch_size=14, dim=1024, depth=24, heads=16, **IMAGENET_224),
    "crate_alpha_large_patch8_224": dict(patch_size=8, dim=1024, depth=24, heads=16, **IMAGENET_224),
    "crate_alpha_huge_patch14_224": dict(patch_size=14, dim=1280, depth=32, heads=16, **IMAGENET_224),
    "crate_alpha_mini_patch4_28": dict(patch_size=4, dim=128, depth=6, heads=4, **GRAYSCALE_28),
}

HUB_ID = "UCSC-VLAA/CRATE-alpha"  # the published weights (apache-2.0)
IN21K_FOLDER = "torch/in21k_Pretrain/"
IN21K_CLASSES = 19167  # the pre-training's class count (its config and the files' heads)

# variant: {tag: hub file}; None: an ImageNet-21K file found by its prefix in IN21K_FOLDER (see
# crate.py's _with_hub_file), since the folder's long file names are not fixed here
PRETRAINED = {
    "crate_alpha_base_patch16_224": {"in21k_ft_in1k": "torch/crate_alpha_B16.pth", "in21k": None},
    "crate_alpha_large_patch14_224": {"in21k_ft_in1k": "torch/crate_alpha_L14.pth", "in21k": None},
    "crate_alpha_base_patch32_224": {"in21k": None},
    "crate_alpha_base_patch8_224": {"in21k": None},
    "crate_alpha_large_patch32_224": {"in21k": None},
    "crate_alpha_large_patch8_224": {"in21k": None},
}


def alpha_variant_config(name: str, **overrides) -> CRATEAlphaConfig:
    return CRATEAlphaConfig(**ALPHA_VARIANTS[name]).with_overrides(**overrides)
