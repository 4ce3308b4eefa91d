"""The released CRATE classifier (docs/math.md §5, docs/architecture.md), literally, in float64.

Module and parameter names follow the official code, so ``state_dict()`` keys are the official keys.
Two attributes make the bridge identities of docs/math.md §6 testable: ``Transformer.rho``, the residual
coefficient (official 1; the paper's 1 − κγ), and ``MSSA.scale``, the temperature (official p^{-½};
the paper's 1). η and λ are attributes of each ISTA block, not parameters, as in the official code.
"""

import re
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import require_float64

LAYERNORM_EPS = 1e-5
DTYPE = torch.float64


def _layer_norm(dim: int, eps: float = LAYERNORM_EPS) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=eps, dtype=DTYPE)


def _linear(fan_in: int, fan_out: int, bias: bool = True) -> nn.Linear:
    return nn.Linear(fan_in, fan_out, bias=bias, dtype=DTYPE)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, num_patches, P·P·C): patches row-major over the grid, each flattened
    (row in patch, column in patch, channel); einops 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)'."""
    B, C, H, W = images.shape
    P = patch_size
    grid = images.reshape(B, C, H // P, P, W // P, P)  # (B, C, h, p1, w, p2)
    return grid.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // P) * (W // P), P * P * C)


class Patchify(nn.Module):
    def __init__(self, patch_size: int):
        super().__init__()
        self.patch_size = patch_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return patchify(images, self.patch_size)


class PreNorm(nn.Module):
    """fn(LayerNorm(x)); the official wrapper (keys ``norm.*`` and ``fn.*``)."""

    def __init__(self, dim: int, fn: nn.Module, eps: float = LAYERNORM_EPS):
        super().__init__()
        self.norm = _layer_norm(dim, eps)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class MSSA(nn.Module):
    """Multi-head subspace self-attention: query = key = value = y·U_k  (docs/math.md §5). W_out has a bias
    in CRATE and none in CRATE-α."""

    def __init__(self, dim: int, heads: int, head_dim: int, out_bias: bool = True):
        super().__init__()
        self.heads = heads
        self.scale = head_dim**-0.5
        self.qkv = _linear(dim, heads * head_dim, bias=False)  # rows k·p..(k+1)·p−1 are U_kᵀ
        identity_out = heads == 1 and head_dim == dim
        self.to_out = (
            nn.Identity() if identity_out else nn.Sequential(_linear(heads * head_dim, dim, bias=out_bias))
        )

    def head_tokens(self, y: torch.Tensor) -> torch.Tensor:
        """(B, N, d) -> (B, K, N, p): w_k = y·U_k."""
        return self.qkv(y).unflatten(-1, (self.heads, -1)).transpose(-3, -2)

    def attention(self, y: torch.Tensor) -> torch.Tensor:
        """(B, K, N, N): softmax over the keys of s·w_k w_kᵀ, row i the weights of query token i."""
        w = self.head_tokens(y)
        return torch.softmax(self.scale * w @ w.transpose(-1, -2), dim=-1)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        heads_out = (self.attention(y) @ self.head_tokens(y)).transpose(-3, -2).flatten(-2)  # (B, N, K·p)
        return self.to_out(heads_out)  # [o_1 … o_K]·W_outᵀ


class ISTA(nn.Module):
    """x⁺ = ReLU(u + η(u − u·Wᵀ)·W − ηλ): one non-negative ISTA step, dictionary D = W (docs/math.md §4)."""

    def __init__(self, dim: int, eta: float, lam: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim, dtype=DTYPE))
        self.eta = eta
        self.lam = lam

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return F.relu(u + self.eta * (u - u @ self.weight.T) @ self.weight - self.eta * self.lam)


class LayerStates(NamedTuple):
    """The stream of one layer, each (B, N, d)."""

    input: torch.Tensor  # Z^ℓ
    mssa: torch.Tensor  # Z^{ℓ+½} = ρ·Z^ℓ + MSSA(LN₁(Z^ℓ))
    ista: torch.Tensor  # Z^{ℓ+1} = ISTA(LN₂(Z^{ℓ+½}))


class Transformer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, head_dim: int, eta: float, lam: float, rho: float):
        super().__init__()
        self.rho = rho
        self.layers = nn.ModuleList(
            nn.ModuleList([PreNorm(dim, MSSA(dim, heads, head_dim)), PreNorm(dim, ISTA(dim, eta, lam))])
            for _ in range(depth)
        )

    def forward_intermediates(self, x: torch.Tensor) -> list[LayerStates]:
        states = []
        for mssa, ista in self.layers:
            z_half = self.rho * x + mssa(x)  # the residual adds the raw stream, not LN₁(x)
            z_next = ista(z_half)  # no residual around ISTA
            states.append(LayerStates(x, z_half, z_next))
            x = z_next
        return states

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_intermediates(x)[-1].ista


def official_state_dict_shapes(
    *,
    dim: int,
    depth: int,
    heads: int,
    head_dim: int,
    patch_size: int,
    channels: int,
    num_patches: int,
    num_classes: int,
) -> dict[str, tuple[int, ...]]:
    """Every key of the official CRATE state dict with its shape (docs/architecture.md)."""
    patch_dim = patch_size * patch_size * channels
    shapes = {
        "pos_embedding": (1, num_patches + 1, dim),
        "cls_token": (1, 1, dim),
        "to_patch_embedding.1.weight": (patch_dim,),
        "to_patch_embedding.1.bias": (patch_dim,),
        "to_patch_embedding.2.weight": (dim, patch_dim),
        "to_patch_embedding.2.bias": (dim,),
        "to_patch_embedding.3.weight": (dim,),
        "to_patch_embedding.3.bias": (dim,),
    }
    for layer in range(depth):
        key = f"transformer.layers.{layer}."
        shapes[key + "0.norm.weight"] = shapes[key + "0.norm.bias"] = (dim,)
        shapes[key + "0.fn.qkv.weight"] = (heads * head_dim, dim)
        if not (heads == 1 and head_dim == dim):
            shapes[key + "0.fn.to_out.0.weight"] = (dim, heads * head_dim)
            shapes[key + "0.fn.to_out.0.bias"] = (dim,)
        shapes[key + "1.norm.weight"] = shapes[key + "1.norm.bias"] = (dim,)
        shapes[key + "1.fn.weight"] = (dim, dim)
    shapes["mlp_head.0.weight"] = shapes["mlp_head.0.bias"] = (dim,)
    shapes["mlp_head.1.weight"] = (num_classes, dim)
    shapes["mlp_head.1.bias"] = (num_classes,)
    return shapes


def _require_anchors(state_dict: dict, anchors, model: str) -> None:
    missing = [key for key in anchors if key not in state_dict]
    if missing:
        raise KeyError(f"state dict lacks {missing}: the {model}'s sizes are read from these keys")


def _depth(state_dict: dict) -> int:
    """The number of layers: one more than the largest ℓ of the keys ``transformer.layers.ℓ.*``."""
    layer_ids = {
        int(m.group(1)) for key in state_dict if (m := re.match(r"transformer\.layers\.(\d+)\.", key))
    }
    return max(layer_ids) + 1


def _head_dim(state_dict: dict, heads: int) -> int:
    """p, from the qkv width K·p of layer 0 and the head count K."""
    inner_dim = state_dict["transformer.layers.0.0.fn.qkv.weight"].shape[0]
    if heads < 1 or inner_dim % heads:
        raise ValueError(
            f"heads={heads} does not divide the qkv width {inner_dim} "
            "(transformer.layers.0.0.fn.qkv.weight has K·p rows)"
        )
    return inner_dim // heads


def _sizes_from_state_dict(state_dict: dict, heads: int) -> dict[str, int]:
    """dim, depth, head_dim, num_patches and num_classes, read from the shapes of four anchor keys."""
    anchors = ("cls_token", "pos_embedding", "transformer.layers.0.0.fn.qkv.weight", "mlp_head.1.weight")
    _require_anchors(state_dict, anchors, "model")
    head_dim = _head_dim(state_dict, heads)
    return dict(
        dim=state_dict["cls_token"].shape[-1],
        depth=_depth(state_dict),
        head_dim=head_dim,
        num_patches=state_dict["pos_embedding"].shape[1] - 1,
        num_classes=state_dict["mlp_head.1.weight"].shape[0],
    )


def check_state_dict(
    state_dict: dict, expected: dict[str, tuple[int, ...]], layout: str = "official CRATE"
) -> None:
    """Every expected key present with its shape and a floating-point dtype, no other key; else one
    ValueError that lists every problem."""
    problems = [
        f"missing key {key!r} (expected shape {shape})"
        for key, shape in expected.items()
        if key not in state_dict
    ]
    problems += [f"unexpected key {key!r}" for key in state_dict if key not in expected]
    for key, shape in expected.items():
        value = state_dict.get(key)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            problems.append(
                f"key {key!r} must be a floating-point tensor, got {getattr(value, 'dtype', type(value))}"
            )
        elif tuple(value.shape) != shape:
            problems.append(f"key {key!r} has shape {tuple(value.shape)}, expected {shape}")
    if problems:
        raise ValueError(f"state dict does not fit the {layout} layout:\n  " + "\n  ".join(problems))


class ReleasedClassifier(nn.Module):
    """What the released CRATE and CRATE-α classifiers share: the check of the images, the embedding
    (patches, the cls token first, the position embedding added), the pooling, the head (LayerNorm,
    Linear) and the forward pass. A subclass has ``patch_size``, ``channels``, ``pool``, ``cls_token``,
    ``pos_embedding``, ``transformer``, ``mlp_head`` and ``patches`` (images -> (B, n, d) patch tokens)."""

    def _check_images(self, images: torch.Tensor) -> None:
        require_float64("images", images)
        if images.ndim != 4 or images.shape[1] != self.channels:
            raise ValueError(f"images must have shape (B, {self.channels}, H, W), got {tuple(images.shape)}")
        P = self.patch_size
        H, W = images.shape[-2:]
        if H % P or W % P:
            raise ValueError(f"image size {H}×{W} is not divisible by the patch size {P}")
        max_patches = self.pos_embedding.shape[1] - 1
        if (H // P) * (W // P) > max_patches:
            raise ValueError(
                f"image size {H}×{W} gives {(H // P) * (W // P)} patches of {P}×{P}, "
                f"more than the {max_patches} position embeddings"
            )

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, N, d) stream entering layer 0 (N = patches + 1, cls first)."""
        self._check_images(images)
        x = self.patches(images)  # (B, n, d)
        cls_tokens = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls_tokens, x], dim=1)
        return x + self.pos_embedding[:, : x.shape[1]]

    def forward_intermediates(self, images: torch.Tensor) -> list[LayerStates]:
        return self.transformer.forward_intermediates(self.embed(images))

    def attention_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per layer ℓ, the MSSA attention (B, K, N, N) on LN₁(Z^ℓ), the layer's own normalised input."""
        states = self.forward_intermediates(images)
        return [
            mssa.fn.attention(mssa.norm(state.input))
            for (mssa, _), state in zip(self.transformer.layers, states, strict=True)
        ]

    def pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, d) stream -> (B, d): the pooled token (``pool``: "cls", the first token, or "mean" over
        all tokens, cls included) after the head's LayerNorm."""
        pooled = x.mean(dim=1) if self.pool == "mean" else x[:, 0]
        return self.mlp_head[0](pooled)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, d) stream -> (B, classes) logits."""
        return self.mlp_head[1](self.pre_logits(x))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.transformer(self.embed(images)))


class OfficialCRATE(ReleasedClassifier):
    """CRATE classifier of the official code in float64: patch embedding, cls token, position
    embedding, ``depth`` layers of MSSA then ISTA, LayerNorm + Linear head on the pooled token."""

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
        eta: float = 0.1,
        lam: float = 0.1,
        rho: float = 1.0,
        pool: str = "cls",
    ):
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.patch_size, self.channels, self.pool = patch_size, channels, pool
        patch_dim = patch_size * patch_size * channels
        self.to_patch_embedding = nn.Sequential(
            Patchify(patch_size), _layer_norm(patch_dim), _linear(patch_dim, dim), _layer_norm(dim)
        )
        self.pos_embedding = nn.Parameter(torch.empty(1, num_patches + 1, dim, dtype=DTYPE))
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim, dtype=DTYPE))
        self.transformer = Transformer(dim, depth, heads, head_dim, eta, lam, rho)
        self.mlp_head = nn.Sequential(_layer_norm(dim), _linear(dim, num_classes))

    @classmethod
    def from_state_dict(
        cls,
        state_dict: dict,
        *,
        heads: int,
        patch_size: int,
        channels: int = 3,
        eta: float = 0.1,
        lam: float = 0.1,
        rho: float = 1.0,
        pool: str = "cls",
    ) -> "OfficialCRATE":
        """Build from a state dict with the official key names; every other size is read from the
        shapes. Floating-point tensors of any precision are widened to float64 (exactly)."""
        sizes = _sizes_from_state_dict(state_dict, heads)
        shape_args = dict(sizes, heads=heads, patch_size=patch_size, channels=channels)
        check_state_dict(state_dict, official_state_dict_shapes(**shape_args))
        model = cls(**shape_args, eta=eta, lam=lam, rho=rho, pool=pool)
        model.load_state_dict({key: value.to(DTYPE) for key, value in state_dict.items()}, strict=True)
        return model

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, n, d): patchify, LayerNorm, Linear, LayerNorm."""
        return self.to_patch_embedding(images)


def uniform_tensor(shape: tuple[int, ...], bound: float, generator: torch.Generator | None) -> torch.Tensor:
    """U(−bound, bound) in float64."""
    return (torch.rand(shape, generator=generator, dtype=DTYPE) * 2 - 1) * bound


def random_official_state_dict(
    *,
    dim: int,
    depth: int,
    heads: int,
    head_dim: int,
    patch_size: int,
    channels: int,
    num_patches: int,
    num_classes: int,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """A float64 state dict drawn as the official code initialises it: position embedding and cls
    token standard normal; Linear layers PyTorch's default U(±1/√fan_in); ISTA dictionary
    kaiming-uniform U(±√(6/d)); LayerNorms weight 1, bias 0."""
    shapes = official_state_dict_shapes(
        dim=dim,
        depth=depth,
        heads=heads,
        head_dim=head_dim,
        patch_size=patch_size,
        channels=channels,
        num_patches=num_patches,
        num_classes=num_classes,
    )
    linear_fan_in = {
        "to_patch_embedding.2": patch_size * patch_size * channels,
        "qkv": dim,
        "to_out.0": heads * head_dim,
        "mlp_head.1": dim,
    }

    state = {}
    for key, shape in shapes.items():
        module = key.rsplit(".", 1)[0]
        fan_in = next((n for name, n in linear_fan_in.items() if module.endswith(name)), None)
        if key in ("pos_embedding", "cls_token"):
            state[key] = torch.randn(shape, generator=generator, dtype=DTYPE)
        elif key.endswith("1.fn.weight"):
            state[key] = uniform_tensor(shape, (6 / dim) ** 0.5, generator)
        elif fan_in is not None:
            state[key] = uniform_tensor(shape, fan_in**-0.5, generator)
        else:
            state[key] = (
                torch.ones(shape, dtype=DTYPE) if key.endswith("weight") else torch.zeros(shape, dtype=DTYPE)
            )
    return state
