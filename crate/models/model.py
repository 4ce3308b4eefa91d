"""CRATE, the fast model: white-box transformer via sparse rate reduction (Yu et al., NeurIPS 2023).

Exactly the released classifier (official code Ma-Lab-Berkeley/CRATE `model/crate.py`; the spec is
docs/architecture.md and docs/math.md §5), written for speed: fused attention, the one-matmul ISTA
step, bf16 autocast, torch.compile. verification/test_fast_model.py proves it equal to the float64
`reference.OfficialCRATE`, layer by layer, forward and backward.

Layout, as timm's vision_transformer.py: the ISTA block and the layer (the shared layers are in
layers.py), the config, the model with timm's method contract, the variants (their timm entries are in
crate.py, the released checkpoints' conversion in released.py). Tokens are (B, N, d) throughout,
N = patches + 1 (cls first).
"""

from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import InvalidError
from .layers import MSSA, NORM_EPS, DropPath, PatchEmbed, exporting, pair
from .recompute import in_eager_autograd, norm_outputs_recomputed
from .released import resample_position_embedding

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@torch.fx.wrap
def ista_step(u: torch.Tensor, W: torch.Tensor, eta: float, lam: float) -> torch.Tensor:
    """ReLU(u + η(uW − uWᵀW) − ηλ) for tokens u (..., d): ReLU(u + u·M − ηλ), M = η(W − WᵀW), one
    token product and d³ for M, where a call has at least d tokens; below that (CRATE-B at batch 1:
    197 tokens, d = 768) M would cost more than a second token product, so ReLU(u + (u − uWᵀ)·ηW − ηλ).
    The residual u stays outside the products in both, which keeps bf16 accurate. torch.export
    takes the first form at every batch (its batch is symbolic); a torch.fx leaf, so that a traced
    model chooses when it runs, as the eager one does."""
    traced_for_export = False
    if not torch.jit.is_scripting():
        traced_for_export = exporting()
    if not traced_for_export and u.numel() < u.shape[-1] * W.shape[0]:
        return F.relu(u + (u - u @ W.T) @ (eta * W) - eta * lam)
    return F.relu(u + u @ ista_matrix(W, eta) - eta * lam)


def ista_matrix(W: torch.Tensor, eta: float) -> torch.Tensor:
    """M = η(W − WᵀW) (d, d), rounded once to the dtype its product u·M runs in. Every token's u·M
    shares M's rounding, so a gradient summed over tokens (a LayerNorm's weight before MSSA) adds it
    coherently: computed in float32 itself, WᵀW's rounding (|WᵀW| ~ 10|M|) made the fast CRATE-MAE's
    LN weight gradients 2.4-3.8 times the plain three-product form's error in float32 with peaky
    attention (3 of 12 seeds past the precision rule; rounded once, at most 2.3: within it). So M is
    computed one dtype wider than the product: float64 for a float32 product (d = 384: 4.3 ms against
    2.3 ms forward and backward, Intel Xeon, 2 cores), float32 for a half-precision one, autocast's
    included (autocast rounds M once as it casts the product's operands; the d³ products stay out of
    it: in bf16 they would round WᵀW first)."""
    if not torch.jit.is_scripting():  # TorchScript has no autocast state for a device
        if torch.is_autocast_enabled(W.device.type):
            return _out_of_autocast(W, eta)
    wide = torch.float64 if W.dtype == torch.float32 else torch.promote_types(W.dtype, torch.float32)
    return _rounded_once(W, eta, wide)


def _out_of_autocast(W: torch.Tensor, eta: float) -> torch.Tensor:
    with torch.autocast(W.device.type, enabled=False):
        return _rounded_once(W, eta, torch.promote_types(W.dtype, torch.float32))


def _rounded_once(W: torch.Tensor, eta: float, wide: torch.dtype) -> torch.Tensor:
    W_wide = W.to(wide)
    return (eta * (W_wide - W_wide.T @ W_wide)).to(W.dtype)


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

    def __init__(self, config: "CRATEConfig", drop_path: float = 0.0):
        super().__init__()
        dim, heads = config.dim, config.heads
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.attn = MSSA(dim, heads, dim // heads, config.drop_rate, config.fused_attn)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.ista = ISTA(dim, config.eta, config.lam)

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


_TIMM_NAMES = {"embed_dim": "dim", "num_heads": "heads", "global_pool": "pool"}
_TIMM_POOLS = {"token": "cls", "avg": "mean", "cls": "cls", "mean": "mean"}


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
    # as timm's ViTs: images of any size divisible by patch_size, the position embedding resampled to
    # their patch grid at forward time (bicubic, the cls token's kept); img_size is the embedding's grid
    dynamic_img_size: bool = False

    def __post_init__(self):
        size = pair(self.img_size)
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
            raise InvalidError("invalid CRATE configuration: " + "; ".join(problems))

    def with_overrides(self, **overrides):
        """This configuration with ``overrides``, in its own names or timm's (embed_dim, num_heads,
        global_pool: "token" or "avg")."""
        overrides = {_TIMM_NAMES.get(key, key): value for key, value in overrides.items()}
        unknown = set(overrides) - {f.name for f in fields(self)}
        if unknown:
            family = type(self).__name__.removesuffix("Config")
            raise TypeError(f"{family} got unexpected arguments {sorted(unknown)}")
        if "pool" in overrides:
            if overrides["pool"] not in _TIMM_POOLS:
                raise InvalidError(
                    f"global_pool must be one of {sorted(_TIMM_POOLS)}, got {overrides['pool']!r}"
                )
            overrides["pool"] = _TIMM_POOLS[overrides["pool"]]
        return replace(self, **overrides)


@torch.fx.wrap
def checked_images(
    images: torch.Tensor, in_chans: int, img_size: tuple[int, int], model: str, patch_size: int = 0
) -> torch.Tensor:
    """The images, unchanged, once checked: a floating-point tensor of shape (B, in_chans, H, W), H × W
    = ``img_size``, or with ``patch_size`` (a model of dynamic_img_size) any H × W it divides.

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
    if patch_size > 0 and images.dim() == 4 and images.shape[1] == in_chans:
        if images.shape[2] % patch_size or images.shape[3] % patch_size:
            raise InvalidError(
                f"{model} (dynamic_img_size) expects images whose height and width are multiples of "
                f"patch_size={patch_size}, got {images.shape[2]}×{images.shape[3]}; resize or pad them"
            )
        return images
    expected = (in_chans, img_size[0], img_size[1])
    if images.dim() != 4 or (images.shape[1], images.shape[2], images.shape[3]) != expected:
        got = ", ".join([str(size) for size in images.shape])
        raise InvalidError(
            f"{model} expects images of shape (B, {expected[0]}, {expected[1]}, {expected[2]}), "
            f"got ({got}); build the model with in_chans/img_size to match, or with dynamic_img_size=True "
            "for any size (position embeddings of a checkpoint are resampled by convert_official_state_dict)"
        )
    return images


class CRATE(nn.Module):
    """CRATE classifier with timm's model contract (forward_features, forward_head, forward_intermediates,
    ...). Build it from a CRATEConfig and/or keyword overrides, or with timm.create_model.

    CRATE-α (crate/models/alpha.py) is this model with another patch embedding and layer: a subclass
    overrides ``config_class``, ``patch_embed_class`` and ``block_class``."""

    config_class = CRATEConfig
    patch_embed_class = PatchEmbed  # (img_size pair, patch_size, in_chans, dim)
    block_class = Block  # (config, drop-path rate)

    def __init__(self, config: CRATEConfig | None = None, **kwargs):
        super().__init__()
        config = self.config = (config or self.config_class()).with_overrides(**kwargs)
        dim = config.dim
        self.num_classes, self.global_pool = config.num_classes, config.pool
        self.num_features = self.head_hidden_size = self.embed_dim = dim
        self.num_prefix_tokens = 1
        self.dynamic_img_size = config.dynamic_img_size
        self.grad_checkpointing = False
        self.recompute_norms = True  # training keeps the LayerNorms' inputs, not their outputs
        self.class_name = type(self).__name__  # names the model in input errors (TorchScript has no type())

        self.patch_embed = self.patch_embed_class(
            pair(config.img_size),
            config.patch_size,
            config.in_chans,
            config.dim,
            strict_img_size=not config.dynamic_img_size,
        )
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))  # standard normal, as the official init
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches + 1, dim))
        self.pos_drop = nn.Dropout(config.drop_rate)
        drop_paths = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.Sequential(*[self.block_class(config, drop_path) for drop_path in drop_paths])
        self.fc_norm = nn.LayerNorm(dim, eps=NORM_EPS)
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

    # -- features ------------------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, d): the stream entering the first layer."""
        embed = self.patch_embed
        if not torch.jit.is_scripting():  # TorchScript: the configured size only
            if self.dynamic_img_size:
                return self._embed_dynamic(images)
        x = embed(checked_images(images, embed.in_chans, embed.img_size, self.class_name))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.pos_drop(x)

    @torch.jit.unused
    def _embed_dynamic(self, images: torch.Tensor) -> torch.Tensor:
        """``embed`` for images of any size the patch divides: the position embedding resampled from
        the configured grid to theirs, as timm's VisionTransformer._pos_embed with dynamic_img_size."""
        embed = self.patch_embed
        x = embed(checked_images(images, embed.in_chans, embed.img_size, self.class_name, embed.patch_size))
        grid = self.patch_grid(images)
        pos_embed = self.pos_embed
        if grid != tuple(embed.grid_size):
            pos_embed = resample_position_embedding(pos_embed, grid, embed.grid_size, self.num_prefix_tokens)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos_embed
        return self.pos_drop(x)

    def patch_grid(self, images: torch.Tensor) -> tuple[int, int]:
        """(h, w) patches of ``images``: the configured grid, or theirs with dynamic_img_size."""
        if self.dynamic_img_size:
            P = self.patch_embed.patch_size
            return images.shape[-2] // P, images.shape[-1] // P
        return self.patch_embed.grid_size

    def run_block(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        """One layer as the training step runs it: checkpointed, or with its norm outputs recomputed."""
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
            x = self.run_block(block, x)
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
            raise InvalidError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
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
                x = self.run_block(block, x)
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
            h, w = self.patch_grid(images)
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
        self.config = self.config.with_overrides(**overrides)
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
            raise InvalidError(f"indices={indices} must be between 1 and the depth {depth}")
        take = list(range(depth - indices, depth))
    else:
        take = [i + depth if i < 0 else i for i in indices]
        if any(not 0 <= i < depth for i in take):
            raise InvalidError(f"indices {list(indices)} out of range for depth {depth}")
    return take, max(take)


# -- variants: their timm entries are in crate.py ------------------------------------------------------
IMAGENET_224 = dict(img_size=(224, 224), in_chans=3, num_classes=1000)
GRAYSCALE_28 = dict(img_size=(28, 28), in_chans=1, num_classes=10)  # Fashion-MNIST and the digits

VARIANTS = {
    "crate_tiny_patch16_224": dict(patch_size=16, dim=384, depth=12, heads=6, **IMAGENET_224),
    "crate_small_patch16_224": dict(patch_size=16, dim=576, depth=12, heads=12, **IMAGENET_224),
    "crate_base_patch16_224": dict(patch_size=16, dim=768, depth=12, heads=12, **IMAGENET_224),
    "crate_large_patch16_224": dict(patch_size=16, dim=1024, depth=24, heads=16, **IMAGENET_224),
    "crate_small_patch8_224": dict(patch_size=8, dim=576, depth=12, heads=12, **IMAGENET_224),
    "crate_base_patch8_224": dict(patch_size=8, dim=768, depth=12, heads=12, **IMAGENET_224),
    "crate_mini_patch4_28": dict(patch_size=4, dim=128, depth=6, heads=4, **GRAYSCALE_28),
    # the CPU demo's model reads out the mean token (README "What make demo shows")
    "crate_mini_patch7_28": dict(patch_size=7, dim=128, depth=6, heads=4, pool="mean", **GRAYSCALE_28),
}


def variant_config(name: str, **overrides) -> CRATEConfig:
    return CRATEConfig(**VARIANTS[name]).with_overrides(**overrides)
