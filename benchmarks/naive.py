"""The baselines: CRATE and CRATE-α written plainly, as the released code states them, float32.

- ``NaiveCRATE`` (official code `model/crate.py`): explicit matmul-softmax attention, the three-matmul
  ISTA step relu(x + η(xW − xWᵀW) − ηλ), reshapes as einops does them.
- ``NaiveCRATEAlpha`` (the released PyTorch port of CRATE-α, UCSC-VLAA/CRATE-alpha
  `torch_inference/model/crate_alpha.py`): the same explicit attention (W_out without bias), and the
  released einsum ODL block, a₁ = relu(η·einsum("pd,nlp->nld", D, u) − ηλ), then the second step and
  the decoder D₁ as the same einsums (docs/crate-alpha.md §1, reference/official_alpha.py).

Each has the parameter names of its fast model (crate.CRATE, crate.CRATEAlpha), so the two
load the same weights and compute the same function (checked in benchmarks/test_throughput.py).
"""

import torch
import torch.nn.functional as F
from torch import nn

from crate import CRATEAlphaConfig, CRATEConfig
from crate.models.alpha import ConvPatchEmbed
from crate.models.layers import PatchEmbed

ALPHA_BLOCK_LAYERNORM_EPS = 1e-6  # the released CRATE-α blocks'; its head's LayerNorm keeps 1e-5


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, proj_bias: bool = True):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim, bias=False)
        # the released code drops W_out when one head spans the whole width
        self.proj = nn.Identity() if heads == 1 else nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, d = x.shape
        w = self.qkv(x).reshape(B, N, self.heads, d // self.heads).permute(0, 2, 1, 3).contiguous()
        dots = torch.matmul(w, w.transpose(-1, -2)) * self.scale
        out = torch.matmul(dots.softmax(dim=-1), w)
        return self.proj(out.permute(0, 2, 1, 3).reshape(B, N, d))


class FeedForward(nn.Module):
    def __init__(self, dim: int, eta: float = 0.1, lam: float = 0.1):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim))
        nn.init.kaiming_uniform_(self.weight)
        self.eta, self.lam = eta, lam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = F.linear(x, self.weight)
        grad_1 = F.linear(x1, self.weight.t())
        grad_2 = F.linear(x, self.weight.t())
        return F.relu(x + self.eta * (grad_2 - grad_1) - self.eta * self.lam)


class NaiveBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.ista = nn.LayerNorm(dim), FeedForward(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.norm1(x)) + x
        return self.ista(self.norm2(x))


class NaiveCRATE(nn.Module):
    def __init__(self, config: CRATEConfig):
        super().__init__()
        size = config.img_size if isinstance(config.img_size, tuple) else (config.img_size,) * 2
        self.patch_embed = PatchEmbed(size, config.patch_size, config.in_chans, config.dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, config.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches + 1, config.dim))
        self.blocks = nn.Sequential(*[NaiveBlock(config.dim, config.heads) for _ in range(config.depth)])
        self.fc_norm, self.head = nn.LayerNorm(config.dim), nn.Linear(config.dim, config.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.fc_norm(self.blocks(x)[:, 0]))


class OvercompleteISTA(nn.Module):
    """The released ODL block, einsum for einsum (the port's `OvercompleteISTABlock`)."""

    def __init__(self, dim: int, ratio: int = 4, eta: float = 0.1, lam: float = 0.1):
        super().__init__()
        self.D = nn.Parameter(torch.empty(dim, ratio * dim))
        self.D1 = nn.Parameter(torch.empty(dim, ratio * dim))
        nn.init.kaiming_uniform_(self.D)
        nn.init.kaiming_uniform_(self.D1)
        self.eta, self.lam = eta, lam

    def codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        negative_lasso_grad = torch.einsum("pd,nlp->nld", self.D, x)
        z1 = F.relu(self.eta * negative_lasso_grad - self.eta * self.lam)
        Dz1 = torch.einsum("dp,nlp->nld", self.D, z1)
        lasso_grad = torch.einsum("pd,nlp->nld", self.D, Dz1 - x)
        z2 = F.relu(z1 - self.eta * lasso_grad - self.eta * self.lam)
        return z1, z2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("dp,nlp->nld", self.D1, self.codes(x)[1])


class NaiveAlphaBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ratio: int, eta: float, lam: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=ALPHA_BLOCK_LAYERNORM_EPS)
        self.attn = Attention(dim, heads, proj_bias=False)
        self.norm2 = nn.LayerNorm(dim, eps=ALPHA_BLOCK_LAYERNORM_EPS)
        self.odl = OvercompleteISTA(dim, ratio, eta, lam)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.norm1(x)) + x
        return self.odl(self.norm2(x)) + x


class NaiveCRATEAlpha(nn.Module):
    def __init__(self, config: CRATEAlphaConfig):
        super().__init__()
        size = config.img_size if isinstance(config.img_size, tuple) else (config.img_size,) * 2
        self.patch_embed = ConvPatchEmbed(size, config.patch_size, config.in_chans, config.dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, config.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches + 1, config.dim))
        ratio, eta, lam = config.dictionary_ratio, config.eta, config.lam
        self.blocks = nn.Sequential(
            *[NaiveAlphaBlock(config.dim, config.heads, ratio, eta, lam) for _ in range(config.depth)]
        )
        self.fc_norm, self.head = nn.LayerNorm(config.dim), nn.Linear(config.dim, config.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.fc_norm(self.blocks(x)[:, 0]))
