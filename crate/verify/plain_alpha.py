"""A plain CRATE-α, written straight from a state dict with the released key names, in any dtype.

F.conv2d patch embedding, explicit matmul-softmax attention (or SDPA; crate/verify/plain.py's
``compress`` with LayerNorm eps 1e-6 and W_out without bias), and the ODL block written literally as
the released code does it (UCSC-VLAA/CRATE-alpha; docs/crate-alpha.md §1), token-major:

    a₁ = ReLU(η·u@D − ηλ),  a₂ = ReLU(a₁ − η·((a₁@Dᵀ − u)@D) − ηλ),  out = z + a₂@D₁ᵀ,  u = LN₂(z).

It is the *plain* implementation of the FlashAttention rule (docs/math.md §8.2) for CRATE-α, as plain.py
is for CRATE; both pre-activations are exposed for the ReLU-flip allowances (docs/math.md §8.4). In
float64 with SDPA attention it is also the independent functional implementation that
verification/test_official_alpha.py checks reference.OfficialCRATEAlpha against (η and λ as given).
"""

import torch
import torch.nn.functional as F

from . import plain

LN_EPS = 1e-6  # the blocks' LayerNorms
HEAD_LN_EPS = 1e-5  # the head's (PyTorch's default)
depth = plain.depth


def embed(state: dict, images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> the stream entering layer 0: Conv2d patches (kernel = stride = P, with bias),
    row-major over the grid, cls token first, position embedding added."""
    weight = state["conv1.weight"]
    x = F.conv2d(images, weight, state["conv1.bias"], stride=weight.shape[-1])  # (B, d, h, w)
    x = x.flatten(2).transpose(1, 2)  # (B, h·w, d)
    x = torch.cat([state["cls_token"].expand(x.shape[0], 1, x.shape[-1]), x], dim=1)
    return x + state["pos_embedding"][:, : x.shape[1]]


def compress(
    state: dict, layer: int, x: torch.Tensor, heads: int, attention: str = "explicit"
) -> torch.Tensor:
    """Z^{ℓ+½} = x + MSSA(LN₁(x)), LN eps 1e-6, W_out without bias."""
    if f"transformer.layers.{layer}.0.fn.to_out.0.bias" in state:
        raise KeyError("a CRATE-α state dict has no W_out bias")
    return plain.compress(state, layer, x, heads, attention, eps=LN_EPS)


def preactivations(
    state: dict, layer: int, z: torch.Tensor, eta: float = 0.1, lam: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre₁, pre₂), the arguments of the two ReLUs of the ODL block at u = LN₂(z), each (B, N, m)."""
    key = f"transformer.layers.{layer}.1."
    u = plain.layer_norm(z, state, key + "norm", LN_EPS)
    D = state[key + "fn.D"]
    pre1 = eta * (u @ D) - eta * lam
    a1 = F.relu(pre1)
    pre2 = a1 - eta * ((a1 @ D.T - u) @ D) - eta * lam
    return pre1, pre2


def sparsify(
    state: dict, layer: int, z: torch.Tensor, eta: float = 0.1, lam: float = 0.1
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """(Z^{ℓ+1} = z + a₂@D₁ᵀ, (pre₁, pre₂)); the codes are a₁ = ReLU(pre₁), a₂ = ReLU(pre₂)."""
    pres = preactivations(state, layer, z, eta, lam)
    return z + F.relu(pres[1]) @ state[f"transformer.layers.{layer}.1.fn.D1"].T, pres


def layer_states(
    state: dict,
    images: torch.Tensor,
    heads: int,
    attention: str = "explicit",
    eta: float = 0.1,
    lam: float = 0.1,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(input, after MSSA, after ODL) of every layer."""
    x, states = embed(state, images), []
    for layer in range(depth(state)):
        z_half = compress(state, layer, x, heads, attention)
        z_next = sparsify(state, layer, z_half, eta, lam)[0]
        states.append((x, z_half, z_next))
        x = z_next
    return states


def head(state: dict, x: torch.Tensor, pool: str = "cls") -> torch.Tensor:
    """Logits from the last layer's output: LayerNorm (eps 1e-5) and Linear on the pooled token."""
    return plain.head(state, x, HEAD_LN_EPS, pool)


def logits(state: dict, images: torch.Tensor, heads: int, attention: str = "explicit") -> torch.Tensor:
    return head(state, layer_states(state, images, heads, attention)[-1][-1])
