"""CRATE, the fast model: white-box transformer via sparse rate reduction (Yu et al., NeurIPS 2023).

Exactly the released classifier (official code Ma-Lab-Berkeley/CRATE `model/crate.py`; the spec is
docs/architecture.md and docs/math.md §5), written for speed: fused attention, the
one-matmul ISTA step, bf16 autocast, torch.compile. verification/test_fast_model.py proves it equal to
the float64 `reference.OfficialCRATE`, layer by layer, forward and backward.

Layout, as timm's vision_transformer.py: blocks (patch embedding, MSSA, ISTA, layer), config, model
with timm's method contract, official-checkpoint conversion, default cfgs, registry entries.
Tokens are (B, N, d) throughout, N = patches + 1 (cls first).
"""

import math
import re
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from crate.attention import symmetric_attention
from crate.recompute import in_eager_autograd, norm_outputs_recomputed

LAYERNORM_EPS = 1e-5  # the official model's (PyTorch's default)


class PatchEmbed(nn.Module):
    """Patches flattened (row in patch, column in patch, channel), then LayerNorm → Linear → LayerNorm."""

    def __init__(self, img_size: tuple[int, int], patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        patch_dim = patch_size * patch_size * in_chans
        self.norm_in = nn.LayerNorm(patch_dim, eps=LAYERNORM_EPS)
        self.proj = nn.Linear(patch_dim, dim)
        self.norm_out = nn.LayerNorm(dim, eps=LAYERNORM_EPS)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # sizes from the configuration (the model checked the images), so that a traced or exported
        # graph has only the batch size free
        B, C, P = images.shape[0], self.in_chans, self.patch_size
        h, w = self.grid_size
        grid = images.reshape(B, C, h, P, w, P)  # (B, C, h, p1, w, p2)
        patches = grid.permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, P * P * C)  # (B, n, p1·p2·c)
        return self.norm_out(self.proj(self.norm_in(patches)))  # (B, n, d)


@torch.fx.wrap
def subspace_attention(w: torch.Tensor, scale: float, fused: bool) -> torch.Tensor:
    """softmax_row(s·w_k w_kᵀ)·w_k per head: (B, K, N, p) -> (B, K, N, p), query = key = value = w.

    ``fused``: F.scaled_dot_product_attention where no gradient flows or its backward is accurate,
    else symmetric_attention; not fused, and under TorchScript and torch.export, the explicit
    matmul-softmax path (see MSSA for why). A leaf of torch.fx traces (torch.fx.wrap), so that a
    traced model makes this choice when it runs, as the eager one does. The autograd function stays
    behind is_scripting (TorchScript cannot compile one) and is_exporting (an exported graph
    differentiates plain operations only).
    """
    autograd = torch.is_grad_enabled() and w.requires_grad
    if fused and (not autograd or _fused_backward_is_accurate(w)):
        return F.scaled_dot_product_attention(w, w, w, scale=scale)
    if fused and not torch.jit.is_scripting():
        if not torch.compiler.is_exporting():
            return symmetric_attention(w, scale)
    return ((w @ w.transpose(-2, -1)) * scale).softmax(dim=-1) @ w


def _fused_backward_is_accurate(w: torch.Tensor) -> bool:
    return w.is_cuda and (w.dtype == torch.float16 or w.dtype == torch.bfloat16)  # see MSSA


class MSSA(nn.Module):
    """Multi-head subspace self-attention: query = key = value = y·U_k per head (docs/math.md §5).

    ``fused_attn`` uses F.scaled_dot_product_attention for inference and for training in float16 or
    bfloat16 (autocast included) on CUDA, and ``symmetric_attention`` (crate/attention.py: one
    backward for q = k = v, three N×N×p products instead of four) for the other training.
    ``fused_attn=False`` takes the explicit matmul-softmax path, which states the math and is the
    in-model oracle. Why: SDPA's backward must keep the precision rule of docs/math.md §8
    (verification/test_symmetric_attention.py). CUDA's flash and memory-efficient kernels keep it
    in float16 and bfloat16, 2.5–2.7× faster than symmetric_attention on an H100, half the memory;
    in float32 the memory-efficient kernel's gradients were 6–17× less accurate than the explicit
    path's, and PyTorch's CPU SDPA backward 5–10× (peaky attention).
    ``proj`` is W_out, with a bias in CRATE and without in CRATE-α (absent when one head spans the
    whole width, as officially).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        proj_drop: float = 0.0,
        fused_attn: bool = True,
        proj_bias: bool = True,
    ):
        super().__init__()
        self.heads, self.head_dim, self.scale = heads, head_dim, head_dim**-0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, heads * head_dim, bias=False)  # rows k·p..(k+1)·p−1 are U_kᵀ
        identity = heads == 1 and head_dim == dim
        self.proj = nn.Identity() if identity else nn.Linear(heads * head_dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, y: torch.Tensor) -> torch.Tensor:
        B, N, _ = y.shape
        return self.qkv(y).reshape(B, N, self.heads, self.head_dim).transpose(1, 2)  # (B, K, N, p)

    def attention(self, y: torch.Tensor) -> torch.Tensor:
        """softmax_row(s·w_k w_kᵀ) per head: (B, K, N, N), each row sums to 1."""
        w = self._heads(y)
        return ((w @ w.transpose(-2, -1)) * self.scale).softmax(dim=-1)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        o = subspace_attention(self._heads(y), self.scale, self.fused_attn)
        o = o.transpose(1, 2).flatten(2)  # (B, N, K·p)
        return self.proj_drop(self.proj(o))


@torch.fx.wrap
def ista_step(u: torch.Tensor, W: torch.Tensor, eta: float, lam: float) -> torch.Tensor:
    """ReLU(u + η(uW − uWᵀW) − ηλ) for tokens u (..., d): ReLU(u + u·M − ηλ), M = η(W − WᵀW), one
    token product and d³ for M, where a call has at least d tokens; below that (CRATE-B at batch 1:
    197 tokens, d = 768) M would cost more than a second token product, so ReLU(u + (u − uWᵀ)·ηW − ηλ).
    The residual u stays outside the products in both, which keeps bf16 accurate. torch.export
    takes the first form at every batch (its batch is symbolic); a torch.fx leaf, so that a traced
    model chooses when it runs, as the eager one does."""
    exporting = False
    if not torch.jit.is_scripting():
        exporting = torch.compiler.is_exporting()
    if not exporting and u.numel() < u.shape[-1] * W.shape[0]:
        return F.relu(u + (u - u @ W.T) @ (eta * W) - eta * lam)
    M = eta * (W - W.T @ W)  # (d, d)
    return F.relu(u + u @ M - eta * lam)


class ISTA(nn.Module):
    """One non-negative ISTA step with dictionary D = weight (docs/math.md §4), ``ista_step``: one
    token matmul instead of the released code's three (two when a call has fewer tokens than d)."""

    def __init__(self, dim: int, eta: float = 0.1, lam: float = 0.1):
        super().__init__()
        self.eta, self.lam = eta, lam
        self.weight = nn.Parameter(torch.empty(dim, dim))
        nn.init.kaiming_uniform_(self.weight)  # the official init: U(±√(6/d))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return ista_step(u, self.weight, self.eta, self.lam)


class Block(nn.Module):
    """One CRATE layer: compression Z^{ℓ+½} = Z^ℓ + MSSA(LN₁(Z^ℓ)), then sparsification
    Z^{ℓ+1} = ISTA(LN₂(Z^{ℓ+½})). ISTA has no residual, so drop-path acts on the MSSA branch only."""

    def __init__(self, dim, heads, head_dim, eta, lam, proj_drop=0.0, drop_path=0.0, fused_attn=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        self.attn = MSSA(dim, heads, head_dim, proj_drop, fused_attn)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        self.ista = ISTA(dim, eta, lam)

    def compress(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.attn(self.norm1(x)))  # the residual adds x, not LN₁(x)

    def sparsify(self, z: torch.Tensor) -> torch.Tensor:
        return self.ista(self.norm2(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sparsify(self.compress(x))


class LayerStates(NamedTuple):
    """One layer's stream, token-major (B, N, d); attention (B, K, N, N) when asked for."""

    input: torch.Tensor  # Z^ℓ
    mssa: torch.Tensor  # Z^{ℓ+½}
    ista: torch.Tensor  # Z^{ℓ+1}
    attention: torch.Tensor | None = None


class DropPath(nn.Module):
    """Stochastic depth on a residual branch (per sample), as timm's DropPath."""

    def __init__(self, probability: float):
        super().__init__()
        self.probability = probability

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = 1 - self.probability
        mask = x.new_empty([x.shape[0]] + [1] * (x.dim() - 1)).bernoulli_(keep)  # (B, 1, …)
        return x * mask / keep


@dataclass(frozen=True)
class CRATEConfig:
    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000  # 0: no classifier, forward returns the pooled features
    dim: int = 384
    depth: int = 12
    heads: int = 6  # head dim = dim / heads, as in every released model
    eta: float = 0.1  # ISTA step size η (a constant, not a parameter)
    lam: float = 0.1  # ISTA threshold weight λ
    pool: str = "cls"  # "cls" (official) or "mean" over all tokens, cls included
    drop_rate: float = 0.0  # dropout after the position embedding, after W_out and before the head
    drop_path_rate: float = 0.0  # stochastic depth of the MSSA branch, linear in depth
    fused_attn: bool = True  # SDPA, or symmetric_attention where its backward is inaccurate; False: explicit

    def __post_init__(self):
        size = _pair(self.img_size)
        problems = []
        if self.dim % self.heads:
            problems.append(f"dim={self.dim} is not divisible by heads={self.heads}")
        if size[0] % self.patch_size or size[1] % self.patch_size:
            problems.append(f"img_size={size[0]}×{size[1]} is not divisible by patch_size={self.patch_size}")
        if self.pool not in ("cls", "mean"):
            problems.append(f"pool must be 'cls' or 'mean', got {self.pool!r}")
        if min(self.dim, self.depth, self.heads, self.patch_size, self.in_chans) < 1 or self.num_classes < 0:
            problems.append("dim, depth, heads, patch_size and in_chans must be >= 1, num_classes >= 0")
        if problems:
            raise ValueError("invalid CRATE configuration: " + "; ".join(problems))


_TIMM_NAMES = {"embed_dim": "dim", "num_heads": "heads", "global_pool": "pool"}
_TIMM_POOLS = {"token": "cls", "avg": "mean", "cls": "cls", "mean": "mean"}


def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _config_from(config: CRATEConfig | None, kwargs: dict, config_class: type = CRATEConfig):
    """A config (``config_class``) with overrides, accepting timm's argument names (embed_dim,
    num_heads, global_pool)."""
    config = config or config_class()
    overrides = {_TIMM_NAMES.get(key, key): value for key, value in kwargs.items()}
    unknown = set(overrides) - {f.name for f in fields(config)}
    if unknown:
        raise TypeError(
            f"{config_class.__name__.removesuffix('Config')} got unexpected arguments {sorted(unknown)}"
        )
    if "pool" in overrides:
        if overrides["pool"] not in _TIMM_POOLS:
            raise ValueError(f"global_pool must be one of {sorted(_TIMM_POOLS)}, got {overrides['pool']!r}")
        overrides["pool"] = _TIMM_POOLS[overrides["pool"]]
    return replace(config, **overrides)


@torch.fx.wrap
def checked_images(
    images: torch.Tensor, in_chans: int, img_size: tuple[int, int], model: str
) -> torch.Tensor:
    """The images, unchanged, once checked: a floating-point tensor of shape (B, in_chans, H, W).

    A leaf of torch.fx traces (torch.fx.wrap) whose output the graph uses, so that a traced model
    still checks its input when it runs; TorchScript compiles it (the type test is Python's only).
    """
    if not torch.jit.is_scripting():
        if not isinstance(images, torch.Tensor):
            raise TypeError(
                f"{model} expects floating-point images, got {type(images).__name__}; "
                "convert with torch.as_tensor(...).float() (and normalise) first"
            )
    if not images.is_floating_point():
        raise TypeError(
            f"{model} expects floating-point images, got {images.dtype}; "
            "convert with .float() (and normalise) first"
        )
    expected = (in_chans, img_size[0], img_size[1])
    if images.dim() != 4 or (images.shape[1], images.shape[2], images.shape[3]) != expected:
        got = ", ".join([str(size) for size in images.shape])
        raise ValueError(
            f"{model} expects images of shape (B, {expected[0]}, {expected[1]}, {expected[2]}), "
            f"got ({got}); build the model with in_chans/img_size to match "
            "(position embeddings of a checkpoint are resampled by convert_official_state_dict)"
        )
    return images


class CRATE(nn.Module):
    """CRATE classifier with timm's model contract (forward_features, forward_head, forward_intermediates,
    ...). Build it from a CRATEConfig and/or keyword overrides, or with timm.create_model.

    CRATE-α (crate/alpha.py) is this model with another patch embedding and layer: a subclass
    overrides ``config_class``, ``make_patch_embed`` and ``make_block``."""

    config_class = CRATEConfig

    def __init__(self, config: CRATEConfig | None = None, **kwargs):
        super().__init__()
        config = self.config = _config_from(config, kwargs, self.config_class)
        dim = config.dim
        self.num_classes, self.global_pool = config.num_classes, config.pool
        self.num_features = self.head_hidden_size = self.embed_dim = dim
        self.num_prefix_tokens = 1
        self.grad_checkpointing = False
        self.recompute_norms = True  # training keeps the LayerNorms' inputs, not their outputs
        self.class_name = type(self).__name__  # names the model in input errors (TorchScript has no type())

        self.patch_embed = self.make_patch_embed(config)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))  # standard normal, as the official init
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches + 1, dim))
        self.pos_drop = nn.Dropout(config.drop_rate)
        drop_paths = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.Sequential(*[self.make_block(config, drop_path) for drop_path in drop_paths])
        self.fc_norm = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        self.head_drop = nn.Dropout(config.drop_rate)
        self.head = nn.Linear(dim, config.num_classes) if config.num_classes > 0 else nn.Identity()
        self.feature_info = [
            dict(module=f"blocks.{i}", num_chs=dim, reduction=config.patch_size) for i in range(config.depth)
        ]
        # timm's data configuration for a model built directly (timm.create_model replaces it)
        channels = config.in_chans
        self.pretrained_cfg = dict(
            input_size=(channels, *self.patch_embed.img_size),
            interpolation="bilinear",
            crop_pct=1.0,
            mean=IMAGENET_MEAN if channels == 3 else (0.5,) * channels,
            std=IMAGENET_STD if channels == 3 else (0.5,) * channels,
        )

    @staticmethod
    def make_patch_embed(config: CRATEConfig) -> nn.Module:
        return PatchEmbed(_pair(config.img_size), config.patch_size, config.in_chans, config.dim)

    @staticmethod
    def make_block(config: CRATEConfig, drop_path: float) -> nn.Module:
        heads = config.heads
        return Block(
            config.dim,
            heads,
            config.dim // heads,
            config.eta,
            config.lam,
            config.drop_rate,
            drop_path,
            config.fused_attn,
        )

    # -- features ------------------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, d): the stream entering the first layer."""
        embed = self.patch_embed
        x = embed(checked_images(images, embed.in_chans, embed.img_size, self.class_name))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.pos_drop(x)

    def _run_block(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        if self.recompute_norms and in_eager_autograd():
            with norm_outputs_recomputed(block.norm1, block.norm2):  # crate/recompute.py
                return block(x)
        return block(x)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        if torch.jit.is_scripting():  # TorchScript can neither checkpoint nor pass a block to a method
            return self.blocks(x)
        for block in self.blocks:
            x = self._run_block(block, x)
        return x  # (B, N, d), the last ISTA output

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0] if self.global_pool == "cls" else x.mean(dim=1)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

    def forward_intermediates(
        self,
        images: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        return_layer_states: bool = False,
        return_attention: bool = False,
    ):
        """timm's contract: the final features and per-layer outputs (the ISTA outputs), NCHW or NLC.

        With ``return_layer_states=True`` each intermediate is instead a LayerStates tuple of
        token-major (B, N, d) tensors: the layer's input, the stream after MSSA and after ISTA, and
        with ``return_attention=True`` the attention maps (B, K, N, N); output_fmt, norm and
        return_prefix_tokens then do not apply.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, last = _take_indices(len(self.blocks), indices)
        x = self.embed(images)
        intermediates = []
        for i, block in enumerate(self.blocks[: last + 1] if stop_early else self.blocks):
            if return_layer_states:
                attention = block.attn.attention(block.norm1(x)) if return_attention else None
                z_half = block.compress(x)
                state = LayerStates(x, z_half, block.sparsify(z_half), attention)
                x = state.ista
            else:
                x = self._run_block(block, x)
                state = self.fc_norm(x) if norm else x
            if i in take:
                intermediates.append(state)
        if not return_layer_states:
            intermediates = self._format(intermediates, images, output_fmt, return_prefix_tokens)
        return intermediates if intermediates_only else (x, intermediates)

    def _format(self, outputs: list, images: torch.Tensor, output_fmt: str, return_prefix_tokens: bool):
        prefix = [y[:, : self.num_prefix_tokens] for y in outputs]
        spatial = [y[:, self.num_prefix_tokens :] for y in outputs]
        if output_fmt == "NCHW":
            h, w = self.patch_embed.grid_size
            spatial = [y.reshape(y.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous() for y in spatial]
        return list(zip(spatial, prefix, strict=True)) if return_prefix_tokens else spatial

    def prune_intermediate_layers(
        self, indices=1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        take, last = _take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: last + 1]
        if prune_norm:
            self.fc_norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take

    # -- timm's model contract -----------------------------------------------------------------------
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        overrides = {"num_classes": num_classes} | ({"pool": global_pool} if global_pool is not None else {})
        self.config = _config_from(self.config, overrides)
        self.num_classes, self.global_pool = self.config.num_classes, self.config.pool
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None)])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable


def _take_indices(depth: int, indices: int | list[int] | None) -> tuple[list[int], int]:
    """timm's rule: None = every layer, an int n = the last n layers, a list = those (negative allowed)."""
    if indices is None:
        take = list(range(depth))
    elif isinstance(indices, int):
        if not 0 < indices <= depth:
            raise ValueError(f"indices={indices} must be between 1 and the depth {depth}")
        take = list(range(depth - indices, depth))
    else:
        take = [i + depth if i < 0 else i for i in indices]
        if any(not 0 <= i < depth for i in take):
            raise ValueError(f"indices {list(indices)} out of range for depth {depth}")
    return take, max(take)


# -- official checkpoints ------------------------------------------------------------------------------
# (released key pattern, this model's key): CRATE (Ma-Lab-Berkeley/CRATE) and CRATE-α (UCSC-VLAA/CRATE-alpha)
_OFFICIAL_KEYS = [
    (r"to_patch_embedding\.1\.(weight|bias)", r"patch_embed.norm_in.\1"),
    (r"to_patch_embedding\.2\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"to_patch_embedding\.3\.(weight|bias)", r"patch_embed.norm_out.\1"),
    (r"transformer\.layers\.(\d+)\.1\.fn\.weight", r"blocks.\1.ista.weight"),
]
_RELEASED_ALPHA_KEYS = [
    (r"conv1\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"transformer\.layers\.(\d+)\.1\.fn\.(D|D1)", r"blocks.\1.odl.\2"),
]
_SHARED_KEYS = [
    (r"cls_token", r"cls_token"),
    (r"pos_embedding", r"pos_embed"),
    (r"transformer\.layers\.(\d+)\.0\.norm\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"transformer\.layers\.(\d+)\.0\.fn\.qkv\.weight", r"blocks.\1.attn.qkv.weight"),
    (r"transformer\.layers\.(\d+)\.0\.fn\.to_out\.0\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"transformer\.layers\.(\d+)\.1\.norm\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"mlp_head\.0\.(weight|bias)", r"fc_norm.\1"),
    (r"mlp_head\.1\.(weight|bias)", r"head.\1"),
]
_LAYOUTS = {"CRATE": _OFFICIAL_KEYS + _SHARED_KEYS, "CRATE-α": _RELEASED_ALPHA_KEYS + _SHARED_KEYS}


def official_layout(state_dict: dict) -> str | None:
    """ "CRATE" or "CRATE-α" for a state dict in a released layout, None for any other."""
    if "pos_embedding" not in state_dict:
        return None
    return "CRATE-α" if "conv1.weight" in state_dict else "CRATE"


def convert_official_state_dict(state_dict: dict, model: CRATE | None = None) -> dict[str, torch.Tensor]:
    """Released key names (CRATE: Ma-Lab-Berkeley/CRATE; CRATE-α: UCSC-VLAA/CRATE-alpha) -> this
    model's; also timm's checkpoint filter.

    Accepts a training checkpoint too (weights under 'state_dict' or 'model', DDP's 'module.' prefix).
    A state dict already in this model's names passes through. With ``model``: the checkpoint must fit
    it (every key but the classifier's present with its shape, no other key; else a ValueError names
    each problem), and the position embedding is resampled (bicubic, cls token kept) when the
    checkpoint's patch grid differs from the model's.
    """
    for wrapper in ("state_dict", "model"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
    state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    layout = official_layout(state_dict)
    if layout is not None:
        state_dict = _rename(state_dict, layout)
    if model is not None:
        if "pos_embed" in state_dict:
            state_dict["pos_embed"] = _resample_position_embedding(state_dict["pos_embed"], model)
        _check_fits(state_dict, model, layout)
    return state_dict


def _rename(state_dict: dict, layout: str) -> dict:
    converted, unknown = {}, []
    for key, value in state_dict.items():
        for pattern, target in _LAYOUTS[layout]:
            if re.fullmatch(pattern, key):
                converted[re.sub(pattern, target, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"keys not in the released {layout} layout: {unknown}")
    return converted


def _check_fits(state_dict: dict, model: nn.Module, layout: str | None) -> None:
    """Strict and loud: every model key but the classifier's (timm drops that one when the class
    count differs) present with its shape, and no other key."""
    expected = model.state_dict()
    problems = [
        f"missing key {key!r} (shape {tuple(expected[key].shape)})"
        for key in expected
        if key not in state_dict and not key.startswith("head.")
    ]
    problems += [
        f"unexpected key {key!r}" for key in state_dict if key not in expected and not key.startswith("head.")
    ]
    problems += [
        f"key {key!r} has shape {tuple(value.shape)}, the model expects {tuple(expected[key].shape)}"
        for key, value in state_dict.items()
        if key in expected and not key.startswith("head.") and value.shape != expected[key].shape
    ]
    if problems:
        source = f"a released {layout} checkpoint" if layout else "the checkpoint"
        raise ValueError(
            f"{source} does not fit {type(model).__name__} ({model.config.dim} wide, "
            f"{len(model.blocks)} layers):\n  " + "\n  ".join(problems)
        )


def _resample_position_embedding(pos_embed: torch.Tensor, model: CRATE) -> torch.Tensor:
    grid = model.patch_embed.grid_size
    if pos_embed.shape[1] == grid[0] * grid[1] + 1:
        return pos_embed
    old = math.isqrt(pos_embed.shape[1] - 1)
    if old * old != pos_embed.shape[1] - 1:
        raise ValueError(
            f"cannot resample a position embedding of {pos_embed.shape[1] - 1} patches: not a square grid"
        )
    return resample_position_embedding(pos_embed, grid, (old, old), num_prefix_tokens=1)


def resample_position_embedding(
    pos_embed: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int], num_prefix_tokens: int
) -> torch.Tensor:
    """(1, prefix + h·w, d) embedding on ``old_grid`` -> on ``new_grid`` (patches row-major), the prefix
    tokens kept: timm's resample_abs_pos_embed (bicubic, antialiased). PyTorch's antialiased
    F.interpolate (2.14, CPU) returns its first output row h times for an output of width 1 and height
    h > 1 (verification/test_position_embedding.py found it); the transposed problem, width h and
    height 1, is right, and a (1, h) grid lists its tokens in the order of the (h, 1) grid."""
    from timm.layers import resample_abs_pos_embed

    if new_grid[1] == 1 and new_grid[0] > 1:
        prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
        transposed = patches.unflatten(1, tuple(old_grid)).transpose(1, 2).flatten(1, 2)
        pos_embed, new_grid, old_grid = torch.cat([prefix, transposed], 1), new_grid[::-1], old_grid[::-1]
    return resample_abs_pos_embed(
        pos_embed, list(new_grid), list(old_grid), num_prefix_tokens=num_prefix_tokens
    )


def load_official_state_dict(model: CRATE, state_dict: dict) -> None:
    """Convert and load strictly: a missing, unexpected or mis-shaped key raises, naming the key."""
    model.load_state_dict(convert_official_state_dict(state_dict, model), strict=True)


# -- default cfgs and registry ---------------------------------------------------------------------------
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)

# name: (patch, dim, depth, heads, input size, classes, mean, std)
VARIANTS = {
    "crate_tiny_patch16_224": (16, 384, 12, 6, (3, 224, 224), 1000, IMAGENET_MEAN, IMAGENET_STD),
    "crate_small_patch16_224": (16, 576, 12, 12, (3, 224, 224), 1000, IMAGENET_MEAN, IMAGENET_STD),
    "crate_base_patch16_224": (16, 768, 12, 12, (3, 224, 224), 1000, IMAGENET_MEAN, IMAGENET_STD),
    "crate_large_patch16_224": (16, 1024, 24, 16, (3, 224, 224), 1000, IMAGENET_MEAN, IMAGENET_STD),
    "crate_small_patch8_224": (8, 576, 12, 12, (3, 224, 224), 1000, IMAGENET_MEAN, IMAGENET_STD),
    "crate_base_patch8_224": (8, 768, 12, 12, (3, 224, 224), 1000, IMAGENET_MEAN, IMAGENET_STD),
    "crate_mini_patch4_28": (4, 128, 6, 4, (1, 28, 28), 10, FASHION_MNIST_MEAN, FASHION_MNIST_STD),
    "crate_mini_patch7_28": (7, 128, 6, 4, (1, 28, 28), 10, FASHION_MNIST_MEAN, FASHION_MNIST_STD),
}
# the CPU demo's model reads out the mean token: +0.3 points of Fashion-MNIST top-1 in its 10 epochs
VARIANT_OPTIONS = {"crate_mini_patch7_28": dict(pool="mean")}


def variant_config(name: str, **overrides) -> CRATEConfig:
    patch, dim, depth, heads, (channels, height, width), classes, _, _ = VARIANTS[name]
    base = CRATEConfig(
        img_size=(height, width),
        patch_size=patch,
        in_chans=channels,
        num_classes=classes,
        dim=dim,
        depth=depth,
        heads=heads,
    )
    return _config_from(base, VARIANT_OPTIONS.get(name, {}) | overrides)


def default_cfg(name: str) -> dict:
    *_, input_size, classes, mean, std = VARIANTS[name]
    return dict(
        url="",
        num_classes=classes,
        input_size=input_size,
        fixed_input_size=True,
        pool_size=None,
        crop_pct=0.875 if input_size[-1] == 224 else 1.0,
        interpolation="bilinear",
        mean=mean,
        std=std,
        first_conv="patch_embed.proj",
        classifier="head",
        license="mit",
        paper_ids="arXiv:2306.01129",
        paper_name="White-Box Transformers via Sparse Rate Reduction",
    )
