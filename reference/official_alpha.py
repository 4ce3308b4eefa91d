"""The released CRATE-α classifier (docs/crate-alpha.md), literally, in float64.

Module and parameter names follow the released PyTorch port (UCSC-VLAA/CRATE-alpha,
`torch_inference/model/crate_alpha.py`), so ``state_dict()`` keys are the keys of the published
weights. The layer: x ← x + MSSA(LN(x)), then x ← x + ODL(LN(x)), LayerNorm eps 1e-6, where the ODL
(over-complete dictionary learning) block is two non-negative ISTA steps from zero on the LASSO with
an over-complete dictionary D ∈ R^{d×4d}, decoded by a second dictionary D₁. The einsum strings are
the released code's; verification/test_odl.py proves them equal to ``reference.proximal_gradient_steps``.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .official import (
    DTYPE,
    MSSA,
    LayerStates,
    PreNorm,
    ReleasedClassifier,
    _depth,
    _head_dim,
    _layer_norm,
    _linear,
    _require_anchors,
    check_state_dict,
    uniform_tensor,
)

LAYERNORM_EPS = 1e-6  # the blocks' LayerNorms; the head's keeps PyTorch's default 1e-5
HEAD_LAYERNORM_EPS = 1e-5


class OvercompleteISTABlock(nn.Module):
    """a₁ = ReLU(η·Dᵀu − ηλ), a₂ = ReLU(a₁ − η·Dᵀ(Da₁ − u) − ηλ), output D₁a₂ (per token u, column form).

    Parameters D (encoder) and D1 (decoder), both d × ratio·d; η and λ are attributes, not parameters.
    """

    def __init__(self, dim: int, ratio: int, eta: float, lam: float):
        super().__init__()
        self.D = nn.Parameter(torch.empty(dim, ratio * dim, dtype=DTYPE))
        self.D1 = nn.Parameter(torch.empty(dim, ratio * dim, dtype=DTYPE))
        self.eta, self.lam = eta, lam

    def codes(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[a₁, a₂], each (B, N, ratio·d)."""
        negative_lasso_grad = torch.einsum("pd,nlp->nld", self.D, x)  # Dᵀu per token
        a1 = F.relu(self.eta * negative_lasso_grad - self.eta * self.lam)
        Da1 = torch.einsum("dp,nlp->nld", self.D, a1)
        lasso_grad = torch.einsum("pd,nlp->nld", self.D, Da1 - x)
        a2 = F.relu(a1 - self.eta * lasso_grad - self.eta * self.lam)
        return [a1, a2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("dp,nlp->nld", self.D1, self.codes(x)[-1])


class Transformer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, head_dim: int, ratio: int, eta: float, lam: float):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PreNorm(dim, MSSA(dim, heads, head_dim, out_bias=False), eps=LAYERNORM_EPS),
                    PreNorm(dim, OvercompleteISTABlock(dim, ratio, eta, lam), eps=LAYERNORM_EPS),
                ]
            )
            for _ in range(depth)
        )

    def forward_intermediates(self, x: torch.Tensor) -> list[LayerStates]:
        states = []
        for mssa, odl in self.layers:
            z_half = x + mssa(x)
            z_next = z_half + odl(z_half)  # unlike CRATE's ISTA, the ODL block has a residual
            states.append(LayerStates(x, z_half, z_next))
            x = z_next
        return states

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_intermediates(x)[-1].ista


def official_alpha_state_dict_shapes(
    *,
    dim: int,
    depth: int,
    heads: int,
    head_dim: int,
    patch_size: int,
    channels: int,
    num_patches: int,
    num_classes: int,
    ratio: int = 4,
) -> dict[str, tuple[int, ...]]:
    """Every key of the released CRATE-α state dict with its shape (docs/crate-alpha.md)."""
    shapes = {
        "pos_embedding": (1, num_patches + 1, dim),
        "cls_token": (1, 1, dim),
        "conv1.weight": (dim, channels, patch_size, patch_size),
        "conv1.bias": (dim,),
    }
    for layer in range(depth):
        key = f"transformer.layers.{layer}."
        shapes[key + "0.norm.weight"] = shapes[key + "0.norm.bias"] = (dim,)
        shapes[key + "0.fn.qkv.weight"] = (heads * head_dim, dim)
        if not (heads == 1 and head_dim == dim):
            shapes[key + "0.fn.to_out.0.weight"] = (dim, heads * head_dim)
        shapes[key + "1.norm.weight"] = shapes[key + "1.norm.bias"] = (dim,)
        shapes[key + "1.fn.D"] = shapes[key + "1.fn.D1"] = (dim, ratio * dim)
    shapes["mlp_head.0.weight"] = shapes["mlp_head.0.bias"] = (dim,)
    shapes["mlp_head.1.weight"] = (num_classes, dim)
    shapes["mlp_head.1.bias"] = (num_classes,)
    return shapes


def _sizes_from_state_dict(state_dict: dict, heads: int) -> dict[str, int]:
    """Every size but the head count, read from the shapes of five anchor keys."""
    anchors = {  # key: its number of dimensions
        "conv1.weight": 4,
        "pos_embedding": 3,
        "transformer.layers.0.0.fn.qkv.weight": 2,
        "transformer.layers.0.1.fn.D": 2,
        "mlp_head.1.weight": 2,
    }
    _require_anchors(state_dict, anchors, "CRATE-α model")
    for key, ndim in anchors.items():
        value = state_dict[key]
        if not isinstance(value, torch.Tensor) or value.ndim != ndim:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"key {key!r} must be a {ndim}-dimensional tensor (sizes are read from it), got {got}"
            )
    dim, channels, patch_size, _ = state_dict["conv1.weight"].shape
    head_dim = _head_dim(state_dict, heads)
    atoms = state_dict["transformer.layers.0.1.fn.D"].shape[-1]
    if atoms % dim:
        raise ValueError(f"transformer.layers.0.1.fn.D has {atoms} columns, not a multiple of d = {dim}")
    return dict(
        dim=dim,
        depth=_depth(state_dict),
        head_dim=head_dim,
        patch_size=patch_size,
        channels=channels,
        num_patches=state_dict["pos_embedding"].shape[1] - 1,
        num_classes=state_dict["mlp_head.1.weight"].shape[0],
        ratio=atoms // dim,
    )


class OfficialCRATEAlpha(ReleasedClassifier):
    """CRATE-α classifier of the released PyTorch port in float64: Conv2d patch embedding with bias,
    cls token, position embedding, ``depth`` layers of MSSA then ODL (both with residuals),
    LayerNorm + Linear head on the cls token (released), or with ``pool="mean"`` on the mean of all
    tokens, cls included: the fast model's option, defined as CRATE's."""

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
        num_classes: int,
        ratio: int = 4,
        eta: float = 0.1,
        lam: float = 0.1,
        pool: str = "cls",
    ):
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.patch_size, self.channels, self.pool = patch_size, channels, pool
        self.conv1 = nn.Conv2d(channels, dim, patch_size, stride=patch_size, bias=True, dtype=DTYPE)
        self.pos_embedding = nn.Parameter(torch.empty(1, num_patches + 1, dim, dtype=DTYPE))
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim, dtype=DTYPE))
        self.transformer = Transformer(dim, depth, heads, head_dim, ratio, eta, lam)
        self.mlp_head = nn.Sequential(_layer_norm(dim, HEAD_LAYERNORM_EPS), _linear(dim, num_classes))

    @classmethod
    def from_state_dict(
        cls, state_dict: dict, *, heads: int, eta: float = 0.1, lam: float = 0.1, pool: str = "cls"
    ) -> "OfficialCRATEAlpha":
        """Build from a state dict with the released key names; every size but the head count is read
        from the shapes. Floating-point tensors of any precision are widened to float64 (exactly)."""
        sizes = _sizes_from_state_dict(state_dict, heads) | dict(heads=heads)
        check_state_dict(state_dict, official_alpha_state_dict_shapes(**sizes), layout="released CRATE-α")
        model = cls(**sizes, eta=eta, lam=lam, pool=pool)
        model.load_state_dict({key: value.to(DTYPE) for key, value in state_dict.items()}, strict=True)
        return model

    def _check_images(self, images: torch.Tensor) -> None:
        super()._check_images(images)
        H, W = images.shape[-2:]
        if H == 0 or W == 0:  # zero patches, which the Conv2d refuses with a message of its own
            raise ValueError(f"image size {H}×{W} has no patches of {self.patch_size}×{self.patch_size}")

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, n, d): Conv2d, patches row-major over the grid."""
        return self.conv1(images).flatten(2).transpose(1, 2)


def random_official_alpha_state_dict(
    *,
    dim: int,
    depth: int,
    heads: int,
    head_dim: int,
    patch_size: int,
    channels: int,
    num_patches: int,
    num_classes: int,
    ratio: int = 4,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """A float64 state dict drawn as the released code initialises it: position embedding and cls token
    standard normal; Conv2d and Linear layers PyTorch's default U(±1/√fan_in) (weight and bias);
    D and D₁ kaiming-uniform U(±√(6/fan_in)) with PyTorch's fan_in = ratio·d (the second dimension);
    LayerNorms weight 1, bias 0."""
    shapes = official_alpha_state_dict_shapes(
        dim=dim,
        depth=depth,
        heads=heads,
        head_dim=head_dim,
        patch_size=patch_size,
        channels=channels,
        num_patches=num_patches,
        num_classes=num_classes,
        ratio=ratio,
    )
    fan_in = {"conv1": channels * patch_size**2, "qkv": dim, "to_out.0": heads * head_dim, "mlp_head.1": dim}
    state = {}
    for key, shape in shapes.items():
        module, _, name = key.rpartition(".")
        linear = next((n for suffix, n in fan_in.items() if module.endswith(suffix)), None)
        if key in ("pos_embedding", "cls_token"):
            state[key] = torch.randn(shape, generator=generator, dtype=DTYPE)
        elif name in ("D", "D1"):
            state[key] = uniform_tensor(shape, (6 / (ratio * dim)) ** 0.5, generator)
        elif linear is not None:
            state[key] = uniform_tensor(shape, linear**-0.5, generator)
        else:
            state[key] = (
                torch.ones(shape, dtype=DTYPE) if name == "weight" else torch.zeros(shape, dtype=DTYPE)
            )
    return state
