"""A plain CRATE, written straight from a state dict with the official key names, in any dtype.

Explicit matmul-softmax attention (or SDPA) and the official three-matmul ISTA, torch.nn.functional
throughout. It is the *plain* implementation of the FlashAttention rule (docs/math.md §8.2): the fast
model's low-precision error is compared with the error this code makes in the same precision. In
float64 with SDPA attention it is also an independent check of reference.OfficialCRATE.
crate/verify/plain_alpha.py is CRATE-α's, built on ``compress`` and ``head`` here; ``sparsify`` has the
interface that both share (output, pre-activations), which verification/precision.py uses for either
family.
"""

import torch
import torch.nn.functional as F

LN_EPS = 1e-5


def layer_norm(x: torch.Tensor, state: dict, key: str, eps: float = LN_EPS) -> torch.Tensor:
    """F.layer_norm with the affine parameters `key`.weight and `key`.bias of the state dict."""
    return F.layer_norm(x, x.shape[-1:], state[key + ".weight"], state[key + ".bias"], eps=eps)


def embed(state: dict, images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> the stream entering layer 0, patches by F.unfold."""
    B, C = images.shape[:2]
    P = patch_size
    columns = F.unfold(images, kernel_size=P, stride=P)  # (B, C·P·P, L), ordered (c, p1, p2)
    x = columns.unflatten(1, (C, P, P)).permute(0, 4, 2, 3, 1).flatten(2)  # (B, L, P·P·C), (p1, p2, c)
    x = layer_norm(x, state, "to_patch_embedding.1")
    x = F.linear(x, state["to_patch_embedding.2.weight"], state["to_patch_embedding.2.bias"])
    x = layer_norm(x, state, "to_patch_embedding.3")
    dim = x.shape[-1]
    x = torch.cat([state["cls_token"].expand(B, 1, dim), x], dim=1)
    return x + state["pos_embedding"][:, : x.shape[1]]


def depth(state: dict) -> int:
    layers = 0
    while f"transformer.layers.{layers}.0.fn.qkv.weight" in state:
        layers += 1
    return layers


def mssa(state: dict, key: str, y: torch.Tensor, heads: int, attention: str = "explicit") -> torch.Tensor:
    """MSSA(y) of the PreNorm at ``key`` (its ``fn.qkv`` and, where the state dict has it,
    ``fn.to_out.0``; none when one head spans the width): explicit matmul-softmax or SDPA."""
    B, N, _ = y.shape
    w = F.linear(y, state[key + "fn.qkv.weight"])
    w = w.reshape(B, N, heads, -1).permute(0, 2, 1, 3)  # (B, K, N, p)
    if attention == "sdpa":
        o = F.scaled_dot_product_attention(w, w, w)
    else:
        o = torch.softmax(w @ w.transpose(-1, -2) * w.shape[-1] ** -0.5, dim=-1) @ w
    o = o.permute(0, 2, 1, 3).reshape(B, N, -1)
    if key + "fn.to_out.0.weight" in state:
        o = F.linear(o, state[key + "fn.to_out.0.weight"], state.get(key + "fn.to_out.0.bias"))
    return o


def compress(
    state: dict, layer: int, x: torch.Tensor, heads: int, attention: str = "explicit", eps: float = LN_EPS
) -> torch.Tensor:
    """Z^{ℓ+½} = x + MSSA(LN₁(x)); W_out's bias is added where the state dict has one (CRATE-α's
    has none), and LN₁ has ``eps`` (CRATE 1e-5, CRATE-α 1e-6)."""
    key = f"transformer.layers.{layer}.0."
    return x + mssa(state, key, layer_norm(x, state, key + "norm", eps), heads, attention)


def ista_preactivation(state: dict, layer: int, z: torch.Tensor, eta=0.1, lam=0.1) -> torch.Tensor:
    """u + η(uW − uWᵀW) − ηλ with u = LN₂(z), the official three-matmul form (before the ReLU)."""
    return ista_preactivation_at(state, f"transformer.layers.{layer}.1.", z, eta, lam)


def ista_preactivation_at(state: dict, key: str, z: torch.Tensor, eta=0.1, lam=0.1) -> torch.Tensor:
    """``ista_preactivation`` of the PreNorm(ISTA) at ``key`` (its ``norm`` and ``fn.weight``)."""
    u = layer_norm(z, state, key + "norm")
    W = state[key + "fn.weight"]
    x1 = F.linear(u, W)  # u·Wᵀ
    return u + eta * (F.linear(u, W.T) - F.linear(x1, W.T)) - eta * lam


def sparsify(
    state: dict, layer: int, z: torch.Tensor, eta: float = 0.1, lam: float = 0.1
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """(Z^{ℓ+1}, its pre-activations): the ISTA output ReLU(pre) and (pre,). The same interface as
    plain_alpha.sparsify; the codes are ReLU of the last pre-activation (here the output itself)."""
    pre = ista_preactivation(state, layer, z, eta, lam)
    return F.relu(pre), (pre,)


def head(state: dict, x: torch.Tensor, eps: float = LN_EPS, pool: str = "cls") -> torch.Tensor:
    """Logits from the last layer's output: LayerNorm (``eps``) and Linear on the cls token (``pool``
    "cls", as released) or on the mean of all tokens ("mean")."""
    pooled = layer_norm(x.mean(dim=1) if pool == "mean" else x[:, 0], state, "mlp_head.0", eps)
    return F.linear(pooled, state["mlp_head.1.weight"], state["mlp_head.1.bias"])


def logits(state: dict, images: torch.Tensor, heads: int, patch_size: int, attention: str = "explicit"):
    x = embed(state, images, patch_size)
    for layer in range(depth(state)):
        x = F.relu(ista_preactivation(state, layer, compress(state, layer, x, heads, attention)))
    return head(state, x)
