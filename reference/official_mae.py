"""The released CRATE-MAE (docs/crate-mae.md), literally, in float64.

Module and parameter names follow the released code (Ma-Lab-Berkeley/CRATE `model/crate_ae/`), so
``state_dict()`` keys are the keys of the published weights. The encoder layer is CRATE's
(z½ = z + MSSA(LN z), out = ISTA(LN z½), no residual around ISTA); the decoder layer runs it backwards:
u = LN(z)·Wᵀ (a linear step, the adjoint of ISTA's dictionary), then out = ρ·u − MSSA(LN u), an ascent
step on the coding rate where the encoder's is a descent step (official ρ = 1; the paper's 1 + κγ,
verification/test_mae.py). Masked patches are replaced by the mask token *before* the encoder (the
encoder sees every position, unlike MAE's), and the loss is the mean squared error on masked patches.

Where the release is written for three channels (``patchify``), this one takes any channel count.
"""

from typing import NamedTuple

import torch
from torch import nn

from ._checks import require_float64
from .official import (
    DTYPE,
    ISTA,
    MSSA,
    PreNorm,
    _layer_norm,
    _linear,
    _require_anchors,
    check_state_dict,
    patchify,
    uniform_tensor,
)

OUTER_NORM_EPS = 1e-6  # norm and decoder_norm (the release's partial(nn.LayerNorm, eps=1e-6))
MASK_RATIO = 0.75


def sincos_position_embedding(dim: int, grid: int) -> torch.Tensor:
    """(1 + grid², dim): MAE's fixed 2-D sin-cos table (``get_2d_sincos_pos_embed``, cls row zeros).
    The first half of the channels encodes a patch's column index (MAE's meshgrid puts w first), the
    second half its row index; each half is [sin(pos·ω), cos(pos·ω)], ω_i = 10000^{−i/(dim/4)}."""
    if dim % 4:
        raise ValueError(f"the sin-cos position embedding needs dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=DTYPE) / (dim / 4))
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=DTYPE), torch.arange(grid, dtype=DTYPE), indexing="ij"
    )

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1) * omega  # (grid², dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(cols), encode(rows)], dim=1)  # (grid², dim)
    return torch.cat([torch.zeros(1, dim, dtype=DTYPE), table])


class Masking(NamedTuple):
    """Per-sample random masking by argsort of noise: keep ⌊L(1 − r)⌋ patches."""

    ids_keep: torch.Tensor  # (B, kept) int64: the kept patches, in the order of their noise
    ids_restore: torch.Tensor  # (B, L) int64: position of each patch in [kept, masked]
    mask: torch.Tensor  # (B, L) float: 1 where masked, 0 where kept


def random_masking(noise: torch.Tensor, mask_ratio: float) -> Masking:
    """The release's ``random_masking`` given its noise (B, L): small noise is kept."""
    if not 0 <= mask_ratio < 1:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    B, L = noise.shape
    keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(B, L, dtype=DTYPE)
    mask[:, :keep] = 0
    return Masking(ids_shuffle[:, :keep], ids_restore, torch.gather(mask, 1, ids_restore))


class LinearStep(nn.Module):
    """u = x·Wᵀ: the decoder's linear step (the release's ``FeedForward``: ``F.linear(x, weight)``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim, dtype=DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T


class LayerStates(NamedTuple):
    """The stream of one encoder layer (input, after MSSA, after ISTA) or one decoder layer (input,
    after the linear step, after −MSSA), each (B, N, d)."""

    input: torch.Tensor
    middle: torch.Tensor
    output: torch.Tensor


class EncoderBlock(nn.Module):
    """``layers.0.0`` = PreNorm(MSSA), ``layers.0.1`` = PreNorm(ISTA): z½ = z + MSSA(LN z), ISTA(LN z½)."""

    def __init__(self, dim: int, heads: int, head_dim: int, eta: float, lam: float):
        super().__init__()
        self.layers = nn.ModuleList(
            [nn.ModuleList([PreNorm(dim, MSSA(dim, heads, head_dim)), PreNorm(dim, ISTA(dim, eta, lam))])]
        )

    def states(self, x: torch.Tensor) -> LayerStates:
        mssa, ista = self.layers[0]
        z_half = x + mssa(x)
        return LayerStates(x, z_half, ista(z_half))


class DecoderBlock(nn.Module):
    """``layers.0.0`` = PreNorm(linear), ``layers.0.1`` = PreNorm(MSSA): u = LN(z)·Wᵀ, ρ·u − MSSA(LN u)."""

    def __init__(self, dim: int, heads: int, head_dim: int, rho: float = 1.0):
        super().__init__()
        self.rho = rho
        self.layers = nn.ModuleList(
            [nn.ModuleList([PreNorm(dim, LinearStep(dim)), PreNorm(dim, MSSA(dim, heads, head_dim))])]
        )

    def states(self, x: torch.Tensor) -> LayerStates:
        linear, mssa = self.layers[0]
        u = linear(x)  # no residual
        return LayerStates(x, u, self.rho * u - mssa(u))


def official_mae_state_dict_shapes(
    *, dim: int, depth: int, heads: int, head_dim: int, patch_size: int, channels: int, num_patches: int
) -> dict[str, tuple[int, ...]]:
    """Every key of the released CRATE-MAE state dict with its shape (decoder width and depth = the
    encoder's, as in every released size)."""
    shapes = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, num_patches + 1, dim),
        "patch_embed.proj.weight": (dim, channels, patch_size, patch_size),
        "patch_embed.proj.bias": (dim,),
    }
    mssa = {"norm.weight": (dim,), "norm.bias": (dim,), "fn.qkv.weight": (heads * head_dim, dim)}
    if not (heads == 1 and head_dim == dim):
        mssa |= {"fn.to_out.0.weight": (dim, heads * head_dim), "fn.to_out.0.bias": (dim,)}
    dictionary = {"norm.weight": (dim,), "norm.bias": (dim,), "fn.weight": (dim, dim)}
    for layer in range(depth):
        for name, shape in mssa.items():
            shapes[f"blocks.{layer}.layers.0.0.{name}"] = shape
        for name, shape in dictionary.items():
            shapes[f"blocks.{layer}.layers.0.1.{name}"] = shape
    shapes |= {
        "norm.weight": (dim,),
        "norm.bias": (dim,),
        "decoder_embed.weight": (dim, dim),
        "decoder_embed.bias": (dim,),
        "mask_token": (1, 1, dim),
        "decoder_pos_embed": (1, num_patches + 1, dim),
    }
    for layer in range(depth):
        for name, shape in dictionary.items():
            shapes[f"decoder_blocks.{layer}.layers.0.0.{name}"] = shape
        for name, shape in mssa.items():
            shapes[f"decoder_blocks.{layer}.layers.0.1.{name}"] = shape
    patch_dim = patch_size * patch_size * channels
    shapes |= {
        "decoder_norm.weight": (dim,),
        "decoder_norm.bias": (dim,),
        "decoder_pred.weight": (patch_dim, dim),
        "decoder_pred.bias": (patch_dim,),
    }
    return shapes


class OfficialCRATEMAE(nn.Module):
    """CRATE-MAE of the released code in float64. ``pos_embed`` and ``decoder_embed`` are in the
    state dict and unused, as released; the encoder adds ``decoder_pos_embed``."""

    def __init__(
        self,
        *,
        dim: int,
        depth: int,
        heads: int,
        head_dim: int,
        patch_size: int,
        channels: int,
        num_patches: int,
        eta: float = 0.1,
        lam: float = 5.0,
        norm_pix_loss: bool = False,
        rho: float = 1.0,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.patch_size, self.channels, self.norm_pix_loss = patch_size, channels, norm_pix_loss
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(channels, dim, patch_size, stride=patch_size, dtype=DTYPE)
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim, dtype=DTYPE))
        self.pos_embed = nn.Parameter(torch.empty(1, num_patches + 1, dim, dtype=DTYPE), requires_grad=False)
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads, head_dim, eta, lam) for _ in range(depth))
        self.norm = _layer_norm(dim, OUTER_NORM_EPS)
        self.decoder_embed = _linear(dim, dim)
        self.mask_token = nn.Parameter(torch.empty(1, 1, dim, dtype=DTYPE))
        self.decoder_pos_embed = nn.Parameter(
            torch.empty(1, num_patches + 1, dim, dtype=DTYPE), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(DecoderBlock(dim, heads, head_dim, rho) for _ in range(depth))
        self.decoder_norm = _layer_norm(dim, OUTER_NORM_EPS)
        self.decoder_pred = _linear(dim, patch_size * patch_size * channels)

    @classmethod
    def from_state_dict(
        cls, state_dict: dict, *, heads: int, eta: float = 0.1, lam: float = 5.0, norm_pix_loss: bool = False
    ) -> "OfficialCRATEMAE":
        """Build from a state dict with the released key names; every size but the head count is read
        from the shapes. Floating-point tensors of any precision are widened to float64 (exactly)."""
        sizes = _sizes_from_state_dict(state_dict, heads)
        check_state_dict(state_dict, official_mae_state_dict_shapes(**sizes), layout="released CRATE-MAE")
        model = cls(**sizes, eta=eta, lam=lam, norm_pix_loss=norm_pix_loss)
        model.load_state_dict({key: value.to(DTYPE) for key, value in state_dict.items()}, strict=True)
        return model

    # -- the encoder ---------------------------------------------------------------------------------
    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, d): timm's PatchEmbed (a Conv2d with bias), patches row-major."""
        require_float64("images", images)
        if images.ndim != 4 or images.shape[1] != self.channels:
            raise ValueError(f"images must have shape (B, {self.channels}, H, W), got {tuple(images.shape)}")
        L = self.decoder_pos_embed.shape[1] - 1
        P = self.patch_size
        if images.shape[2] % P or images.shape[3] % P or (images.shape[2] // P) * (images.shape[3] // P) != L:
            raise ValueError(
                f"images of {images.shape[2]}×{images.shape[3]} do not give the {L} patches of {P}×{P}"
            )
        return self.patch_embed.proj(images).flatten(2).transpose(1, 2)

    def encoder_input(self, images: torch.Tensor, masking: Masking) -> torch.Tensor:
        """(B, L + 1, d): cls, then every patch in place, masked ones replaced by the mask token, plus
        ``decoder_pos_embed`` (the release's ``forward_encoder`` up to its blocks)."""
        x = self.patch_tokens(images)
        B, L, d = x.shape
        kept = torch.gather(x, 1, masking.ids_keep.unsqueeze(-1).expand(-1, -1, d))
        shuffled = torch.cat([kept, self.mask_token.expand(B, L - kept.shape[1], d)], dim=1)
        unshuffled = torch.gather(shuffled, 1, masking.ids_restore.unsqueeze(-1).expand(-1, -1, d))
        x = torch.cat([self.cls_token.expand(B, -1, -1), unshuffled], dim=1)
        return x + self.decoder_pos_embed

    def encoder_states(self, x: torch.Tensor) -> list[LayerStates]:
        states = []
        for block in self.blocks:
            states.append(block.states(x))
            x = states[-1].output
        return states

    def forward_encoder(self, images: torch.Tensor, masking: Masking) -> torch.Tensor:
        """(B, L + 1, d) latent: the encoder's last output after ``norm``."""
        return self.norm(self.encoder_states(self.encoder_input(images, masking))[-1].output)

    # -- the decoder ---------------------------------------------------------------------------------
    def decoder_states(self, latent: torch.Tensor) -> list[LayerStates]:
        states, x = [], latent
        for block in self.decoder_blocks:
            states.append(block.states(x))
            x = states[-1].output
        return states

    def forward_decoder(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, L + 1, d) latent -> (B, L, P²·C) predicted patches, cls dropped."""
        x = self.decoder_states(latent)[-1].output
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over pixels of (pred − target)², then the mean over masked patches (mask = 1)."""
        target = patchify(images, self.patch_size)
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred - target) ** 2).mean(-1)  # (B, L)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, images: torch.Tensor, noise: torch.Tensor, mask_ratio: float = MASK_RATIO):
        """(loss, pred (B, L, P²·C), mask (B, L)) for the masking that ``noise`` (B, L) draws."""
        masking = random_masking(noise, mask_ratio)
        pred = self.forward_decoder(self.forward_encoder(images, masking))
        return self.forward_loss(images, pred, masking.mask), pred, masking.mask


def _sizes_from_state_dict(state_dict: dict, heads: int) -> dict[str, int]:
    anchors = ("patch_embed.proj.weight", "decoder_pos_embed", "blocks.0.layers.0.0.fn.qkv.weight")
    _require_anchors(state_dict, anchors, "CRATE-MAE model")
    dim, channels, patch_size, _ = state_dict["patch_embed.proj.weight"].shape
    inner = state_dict["blocks.0.layers.0.0.fn.qkv.weight"].shape[0]
    if heads < 1 or inner % heads:
        raise ValueError(f"heads={heads} does not divide the qkv width {inner}")
    depth = 1 + max(int(key.split(".")[1]) for key in state_dict if key.startswith("blocks."))
    return dict(
        dim=dim,
        depth=depth,
        heads=heads,
        head_dim=inner // heads,
        patch_size=patch_size,
        channels=channels,
        num_patches=state_dict["decoder_pos_embed"].shape[1] - 1,
    )


def random_official_mae_state_dict(
    *,
    dim: int,
    depth: int,
    heads: int,
    head_dim: int,
    patch_size: int,
    channels: int,
    num_patches: int,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """A float64 test state dict at the released initialisation's scales, with every parameter
    non-trivial so that a test sees each: Linear and Conv2d weights and biases U(±1/√fan_in) (the
    release: xavier weights, zero biases), the dictionaries kaiming-uniform U(±√(6/d)) as released,
    LayerNorm weights U(0.5, 1.5) and biases U(±0.1) (the release: 1 and 0), cls and mask tokens
    N(0, 0.02²) as released, both position embeddings the release's sin-cos table."""
    shapes = official_mae_state_dict_shapes(
        dim=dim,
        depth=depth,
        heads=heads,
        head_dim=head_dim,
        patch_size=patch_size,
        channels=channels,
        num_patches=num_patches,
    )
    grid = int(num_patches**0.5)
    table = sincos_position_embedding(dim, grid).unsqueeze(0) if grid * grid == num_patches else None
    fan_in = {"patch_embed.proj": channels * patch_size**2, "qkv": dim, "to_out.0": heads * head_dim}
    fan_in |= {"decoder_embed": dim, "decoder_pred": dim}
    state = {}
    for key, shape in shapes.items():
        module, _, name = key.rpartition(".")
        linear = next((n for suffix, n in fan_in.items() if module.endswith(suffix)), None)
        if key in ("pos_embed", "decoder_pos_embed"):
            state[key] = table if table is not None else torch.randn(shape, generator=generator, dtype=DTYPE)
        elif key in ("cls_token", "mask_token"):
            state[key] = 0.02 * torch.randn(shape, generator=generator, dtype=DTYPE)
        elif linear is not None:
            state[key] = uniform_tensor(shape, linear**-0.5, generator)
        elif name == "weight" and len(shape) == 2:  # the ISTA and the decoder's linear dictionaries
            state[key] = uniform_tensor(shape, (6 / dim) ** 0.5, generator)
        elif name == "weight":
            state[key] = 1 + uniform_tensor(shape, 0.5, generator)
        else:
            state[key] = uniform_tensor(shape, 0.1, generator)
    return state
