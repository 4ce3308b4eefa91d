"""The baseline: CRATE written plainly, as the official description states it (official code
`model/crate.py`): explicit matmul-softmax attention, the three-matmul ISTA step
relu(x + η(xW − xWᵀW) − ηλ), reshapes as einops does them, float32. Same parameters as the fast model,
so the two load the same weights and compute the same function."""

import torch
import torch.nn.functional as F
from torch import nn

from crate import CRATEConfig
from crate.model import PatchEmbed


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)

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
