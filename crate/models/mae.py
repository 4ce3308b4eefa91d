"""CRATE-MAE, the fast model: the white-box masked autoencoder (Pai et al., "Masked Completion via
Structured Diffusion with White-Box Transformers", ICLR 2024).

Exactly the released model (Ma-Lab-Berkeley/CRATE `model/crate_ae/`, docs/crate-mae.md): the encoder
is CRATE's layer (model.py's Block) behind a Conv2d patch embedding; the decoder runs each layer
backwards, u = LN₁(z)·Wᵀ then u − MSSA(LN₂(u)), an ascent step on the coding rate. Masked patches are
replaced by the mask token *before* the encoder (it sees every position, unlike MAE's), a fixed 2-D
sin-cos position embedding is added, and the loss is the mean squared error on the masked patches.
verification/test_mae.py proves it equal to the float64 `reference.OfficialCRATEMAE`, layer by layer.

``CRATEMAEEncoder`` is the encoder as a CRATE classifier (timm's model contract) for linear probing
and fine-tuning; ``encoder_state_dict`` gives it an autoencoder's weights. Tokens are (B, N, d),
N = patches + 1 (cls first).
"""

import re
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import InvalidError
from .alpha import ConvPatchEmbed
from .layers import MSSA, NORM_EPS, pair
from .model import CRATE, Block, CRATEConfig, LayerStates, checked_images

OUTER_NORM_EPS = 1e-6  # the encoder's final norm and decoder_norm, as released; the blocks' keep 1e-5
LAM_RELEASED = 5.0  # λ of the published Base weights: the code they were released with (docs/crate-mae.md)


@dataclass(frozen=True)
class CRATEMAEConfig(CRATEConfig):
    dim: int = 768  # defaults: CRATE-MAE-B/16; the decoder has the encoder's width, depth and heads
    heads: int = 12
    num_classes: int = 0  # the autoencoder has no classifier; CRATEMAEEncoder's head has this many classes
    lam: float = LAM_RELEASED
    mask_ratio: float = 0.75  # the fraction of patches replaced by the mask token in training
    norm_pix_loss: bool = False  # the target: each patch normalised to zero mean, unit variance

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.mask_ratio < 1:
            raise InvalidError(
                f"invalid CRATE-MAE configuration: mask_ratio must be in [0, 1), got {self.mask_ratio}"
            )
        if self.dim % 4:
            raise InvalidError(
                f"invalid CRATE-MAE configuration: dim={self.dim} must be divisible by 4 "
                "(the sin-cos position embedding)"
            )


def sincos_position_embedding(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """(1, 1 + h·w, dim): MAE's fixed 2-D sin-cos table, cls row zeros. The first half of the channels
    encodes a patch's column, the second its row, each as [sin(pos·ω), cos(pos·ω)], ω_i = 10000^{−4i/dim}."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64), indexing="ij"
    )

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([torch.zeros(1, dim, dtype=torch.float64), torch.cat([encode(cols), encode(rows)], 1)])
    return table.float().unsqueeze(0)


class Masking(NamedTuple):
    """Per-sample random masking by the argsort of noise (small noise is kept)."""

    ids_keep: torch.Tensor  # (B, kept): the kept patches, in the order of their noise
    ids_restore: torch.Tensor  # (B, L): each patch's position in [kept, masked]
    mask: torch.Tensor  # (B, L): 1 where masked, 0 where kept


def random_masking(noise: torch.Tensor, mask_ratio: float) -> Masking:
    """The release's masking given its noise (B, L): ⌊L(1 − r)⌋ patches kept per image."""
    B, L = noise.shape
    keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(B, L, device=noise.device)
    mask[:, :keep] = 0
    return Masking(ids_shuffle[:, :keep], ids_restore, torch.gather(mask, 1, ids_restore))


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, P·P·C), each patch flattened (row in patch, column in patch, channel)."""
    B, C, H, W = images.shape
    P = patch_size
    grid = images.reshape(B, C, H // P, P, W // P, P)
    return grid.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // P) * (W // P), P * P * C)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int], channels: int) -> torch.Tensor:
    """(B, L, P·P·C) -> (B, C, H, W), the inverse of ``patchify``."""
    B, P, (h, w) = patches.shape[0], patch_size, grid
    blocks = patches.reshape(B, h, w, P, P, channels).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p1, w, p2)
    return blocks.reshape(B, channels, h * P, w * P)


class DecoderBlock(nn.Module):
    """One decoder layer, an encoder layer run backwards: the linear step u = LN₁(Z)·Wᵀ (no residual,
    W ≈ the encoder's dictionary), then the expansion Z' = u − MSSA(LN₂(u))."""

    def __init__(self, config: CRATEMAEConfig):
        super().__init__()
        dim, heads = config.dim, config.heads
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.linear = nn.Linear(dim, dim, bias=False)
        nn.init.kaiming_uniform_(self.linear.weight)  # the released init: U(±√(6/d))
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.attn = MSSA(dim, heads, dim // heads, config.drop_rate, config.fused_attn)

    def unsparsify(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm1(x))

    def expand(self, u: torch.Tensor) -> torch.Tensor:
        return u - self.attn(self.norm2(u))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.unsparsify(x))


class CRATEMAE(nn.Module):
    """The masked autoencoder: ``forward_encoder`` / ``forward_decoder`` / ``forward_loss`` as released,
    ``forward(images)`` -> (loss, pred, mask); ``forward_features`` encodes every patch (no masking)."""

    config_class = CRATEMAEConfig

    def __init__(self, config: CRATEMAEConfig | None = None, **kwargs):
        super().__init__()
        config = self.config = (config or self.config_class()).with_overrides(**kwargs)
        dim = self.embed_dim = config.dim
        self.class_name = type(self).__name__
        self.grad_checkpointing = False
        self.patch_embed = ConvPatchEmbed(pair(config.img_size), config.patch_size, config.in_chans, dim)
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.mask_token = nn.Parameter(torch.empty(1, 1, dim))
        self.register_buffer("pos_embed", sincos_position_embedding(dim, self.patch_embed.grid_size))
        drop_paths = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.Sequential(*[Block(config, drop_path) for drop_path in drop_paths])
        self.norm = nn.LayerNorm(dim, eps=OUTER_NORM_EPS)
        self.decoder_blocks = nn.Sequential(*[DecoderBlock(config) for _ in range(config.depth)])
        self.decoder_norm = nn.LayerNorm(dim, eps=OUTER_NORM_EPS)
        self.decoder_pred = nn.Linear(dim, config.patch_size**2 * config.in_chans)
        self._init_weights()

    def _init_weights(self) -> None:
        """The release's: xavier-uniform Linear and patch weights, zero biases, N(0, 0.02²) tokens; the
        dictionaries (ISTA's and the decoder's linear step) keep kaiming-uniform."""
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.xavier_uniform_(self.patch_embed.proj.weight.view(self.embed_dim, -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        dictionaries = {block.linear for block in self.decoder_blocks}
        for module in self.modules():
            if isinstance(module, nn.Linear) and module not in dictionaries:
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # -- masking and patches --------------------------------------------------------------------------
    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def random_masking(self, images: torch.Tensor, mask_ratio: float | None = None, noise=None) -> Masking:
        """A masking of ``images``' patches: ``noise`` (B, L) given, or uniform from torch's generator."""
        ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        if not 0 <= ratio < 1:
            raise InvalidError(f"mask_ratio must be in [0, 1), got {ratio}")
        shape = (images.shape[0], self.num_patches)
        if noise is None:
            noise = torch.rand(shape, device=images.device)
        elif tuple(noise.shape) != shape:
            raise InvalidError(f"noise must have shape (B, L) = {shape}, got {tuple(noise.shape)}")
        return random_masking(noise, ratio)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        return patchify(images, self.config.patch_size)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        return unpatchify(patches, self.config.patch_size, self.patch_embed.grid_size, self.config.in_chans)

    # -- encoder --------------------------------------------------------------------------------------
    def embed(self, images: torch.Tensor, masking: Masking | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, L + 1, d): cls, every patch in place (masked ones: the mask token), plus
        the sin-cos embedding; no masking: every patch."""
        embed = self.patch_embed
        x = embed(checked_images(images, embed.in_chans, embed.img_size, self.class_name))  # (B, L, d)
        if masking is not None:
            masked = masking.mask.unsqueeze(-1).to(torch.bool)
            x = torch.where(masked, self.mask_token, x)  # promoted, not rounded, under autocast
        cls_tokens = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls_tokens, x], dim=1) + self.pos_embed

    def _run(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = self._run(block, x)
        return self.norm(x)

    def forward_encoder(self, images: torch.Tensor, mask_ratio: float | None = None, noise=None):
        """(latent (B, L + 1, d), mask (B, L), ids_restore (B, L)), as released."""
        masking = self.random_masking(images, mask_ratio, noise)
        return self.encode(self.embed(images, masking)), masking.mask, masking.ids_restore

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, L + 1, d): the encoder on every patch, after its norm (for probes)."""
        return self.encode(self.embed(images))

    # -- decoder and loss -----------------------------------------------------------------------------
    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L + 1, d) latent -> (B, L, P²·C) predicted patches (cls dropped). ``ids_restore`` is
        accepted for the release's signature and unused there too (the encoder unshuffled)."""
        x = latent
        for block in self.decoder_blocks:
            x = self._run(block, x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over pixels of (pred − target)², then over the masked patches; in float32 at least."""
        dtype = torch.promote_types(pred.dtype, torch.float32)
        target = self.patchify(images).to(dtype)
        if self.config.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred.to(dtype) - target) ** 2).mean(-1)  # (B, L)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, images: torch.Tensor, mask_ratio: float | None = None, noise=None):
        """(loss, pred (B, L, P²·C), mask (B, L))."""
        latent, mask, ids_restore = self.forward_encoder(images, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(images, pred, mask), pred, mask

    def reconstruct(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W): the visible patches of ``images`` and the predicted ones where masked (targets
        in pixels, so only without norm_pix_loss)."""
        patches = torch.where(mask.unsqueeze(-1).to(torch.bool), pred.to(images.dtype), self.patchify(images))
        return self.unpatchify(patches)

    # -- white-box measurements -----------------------------------------------------------------------
    def layer_states(self, images: torch.Tensor, masking: Masking | None = None):
        """(encoder, decoder): per layer a LayerStates of (input, middle, output), middle = after MSSA
        in an encoder layer, after the linear step in a decoder layer; ``ista`` is the output."""
        encoder, x = [], self.embed(images, masking)
        for block in self.blocks:
            z_half = block.compress(x)
            encoder.append(LayerStates(x, z_half, block.sparsify(z_half)))
            x = encoder[-1].ista
        decoder, x = [], self.norm(x)
        for block in self.decoder_blocks:
            u = block.unsparsify(x)
            decoder.append(LayerStates(x, u, block.expand(u)))
            x = decoder[-1].ista
        return encoder, decoder

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "mask_token"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable


class CRATEMAEEncoder(CRATE):
    """The CRATE-MAE encoder as a classifier with timm's contract (CRATE's, with the Conv2d patch
    embedding and the sin-cos table as the initial position embedding), for linear probes and fine-tuning:
    ``model.load_state_dict(encoder_state_dict(mae.state_dict()))``."""

    config_class = CRATEMAEConfig
    patch_embed_class = ConvPatchEmbed

    def __init__(self, config: CRATEMAEConfig | None = None, **kwargs):
        super().__init__(config, **kwargs)
        self.fc_norm = nn.LayerNorm(self.embed_dim, eps=OUTER_NORM_EPS)  # the autoencoder's final norm
        with torch.no_grad():
            self.pos_embed.copy_(sincos_position_embedding(self.embed_dim, self.patch_embed.grid_size))


def encoder_state_dict(mae_state: dict) -> dict[str, torch.Tensor]:
    """A CRATEMAE state dict (this project's names) -> CRATEMAEEncoder's, without the classifier: the
    decoder and mask token dropped, the encoder's final norm becoming the head's ``fc_norm``."""
    encoder = {}
    for key, value in mae_state.items():
        if key.startswith(("decoder_", "mask_token")):
            continue
        encoder[re.sub(r"^norm\.", "fc_norm.", key)] = value
    return encoder


# -- the released layout (Ma-Lab-Berkeley/CRATE model/crate_ae/) ------------------------------------------
_RELEASED_MAE_KEYS = [
    (r"(blocks)\.(\d+)\.layers\.0\.0\.norm\.(weight|bias)", r"\1.\2.norm1.\3"),
    (r"(blocks)\.(\d+)\.layers\.0\.0\.fn\.qkv\.weight", r"\1.\2.attn.qkv.weight"),
    (r"(blocks)\.(\d+)\.layers\.0\.0\.fn\.to_out\.0\.(weight|bias)", r"\1.\2.attn.proj.\3"),
    (r"(blocks)\.(\d+)\.layers\.0\.1\.norm\.(weight|bias)", r"\1.\2.norm2.\3"),
    (r"(blocks)\.(\d+)\.layers\.0\.1\.fn\.weight", r"\1.\2.ista.weight"),
    (r"(decoder_blocks)\.(\d+)\.layers\.0\.0\.norm\.(weight|bias)", r"\1.\2.norm1.\3"),
    (r"(decoder_blocks)\.(\d+)\.layers\.0\.0\.fn\.weight", r"\1.\2.linear.weight"),
    (r"(decoder_blocks)\.(\d+)\.layers\.0\.1\.norm\.(weight|bias)", r"\1.\2.norm2.\3"),
    (r"(decoder_blocks)\.(\d+)\.layers\.0\.1\.fn\.qkv\.weight", r"\1.\2.attn.qkv.weight"),
    (r"(decoder_blocks)\.(\d+)\.layers\.0\.1\.fn\.to_out\.0\.(weight|bias)", r"\1.\2.attn.proj.\3"),
    (r"decoder_pos_embed", r"pos_embed"),
    (r"(cls_token|mask_token|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias))", r"\1"),
    (r"(decoder_norm|decoder_pred)\.(weight|bias)", r"\1.\2"),
]
_UNUSED_RELEASED_KEYS = ("pos_embed", "decoder_embed.weight", "decoder_embed.bias")  # unused by the release


def convert_released_mae_state_dict(state_dict: dict) -> dict[str, torch.Tensor]:
    """The released CRATE-MAE key names -> CRATEMAE's (the release's unused ``pos_embed`` and
    ``decoder_embed`` dropped). Takes an MAE training checkpoint too (weights under 'model')."""
    if isinstance(state_dict.get("model"), dict):
        state_dict = state_dict["model"]
    converted, unknown = {}, []
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key in _UNUSED_RELEASED_KEYS:
            continue
        for pattern, target in _RELEASED_MAE_KEYS:
            if re.fullmatch(pattern, key):
                converted[re.sub(pattern, target, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise InvalidError(f"keys not in the released CRATE-MAE layout: {unknown}")
    return converted


def load_released_mae_state_dict(model: CRATEMAE, state_dict: dict) -> None:
    """Load released CRATE-MAE weights into ``model``, strictly: every key present with its shape, no
    other; else one InvalidError naming each problem."""
    converted = convert_released_mae_state_dict(state_dict)
    expected = model.state_dict()
    problems = [
        f"missing {key} {tuple(value.shape)}" for key, value in expected.items() if key not in converted
    ]
    problems += [f"unexpected {key}" for key in converted if key not in expected]
    problems += [
        f"{key}: {tuple(value.shape)} in the checkpoint, {tuple(expected[key].shape)} in the model"
        for key, value in converted.items()
        if key in expected and tuple(value.shape) != tuple(expected[key].shape)
    ]
    if problems:
        raise InvalidError(
            f"the released CRATE-MAE checkpoint does not fit {type(model).__name__} "
            f"({model.config.dim} wide, {model.config.depth} layers): " + "; ".join(problems)
        )
    model.load_state_dict(converted, strict=True)


# -- variants (the release's sizes; their timm entries are in crate.py) -----------------------------------
MAE_IMAGENET_224 = dict(img_size=(224, 224), in_chans=3, patch_size=16)
MAE_VARIANTS = {
    "crate_mae_tiny_patch16_224": dict(dim=384, depth=12, heads=6, **MAE_IMAGENET_224),
    "crate_mae_small_patch16_224": dict(dim=576, depth=12, heads=12, **MAE_IMAGENET_224),
    "crate_mae_base_patch16_224": dict(dim=768, depth=12, heads=12, **MAE_IMAGENET_224),
    "crate_mae_large_patch16_224": dict(dim=1024, depth=24, heads=16, **MAE_IMAGENET_224),
    # the CPU demo's: 28×28 grayscale, 49 patches of 4×4
    "crate_mae_mini_patch4_28": dict(img_size=(28, 28), in_chans=1, patch_size=4, dim=128, depth=4, heads=4),
}


def mae_variant_config(name: str, **overrides) -> CRATEMAEConfig:
    return CRATEMAEConfig(**MAE_VARIANTS[name]).with_overrides(**overrides)
