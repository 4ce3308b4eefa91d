"""A plain CRATE-MAE, written straight from a state dict with the released key names, in any dtype.

The released code's operations (Ma-Lab-Berkeley/CRATE `model/crate_ae/`, docs/crate-mae.md), token-major,
torch.nn.functional throughout: F.conv2d patches, the release's gather/concatenate/unshuffle masking,
explicit matmul-softmax attention and the three-matmul ISTA of plain.py in the encoder, and the decoder's

    u = LN₁(z)·Wᵀ,  out = u − MSSA(LN₂(u)),

then decoder_norm and decoder_pred (cls dropped) and the mean squared error on the masked patches. It is
the *plain* implementation of the precision rule (docs/math.md §8.2) for CRATE-MAE, as plain.py is for
CRATE: the fast model's low-precision error is compared with the error this code makes in the same
precision. ``masking`` is reference.official_mae's Masking (ids_keep, ids_restore, mask) of the noise.
"""

import torch
import torch.nn.functional as F

from . import plain

LN_EPS = plain.LN_EPS  # the blocks' LayerNorms
OUTER_NORM_EPS = 1e-6  # norm and decoder_norm


def depth(state: dict) -> int:
    layers = 0
    while f"blocks.{layers}.layers.0.0.fn.qkv.weight" in state:
        layers += 1
    return layers


def _encoder_key(layer: int, part: int) -> str:
    return f"blocks.{layer}.layers.0.{part}."


def _decoder_key(layer: int, part: int) -> str:
    return f"decoder_blocks.{layer}.layers.0.{part}."


def embed(state: dict, images: torch.Tensor, masking) -> torch.Tensor:
    """(B, C, H, W) -> (B, L + 1, d), the stream entering encoder layer 0: Conv2d patches, the kept ones
    gathered, mask tokens appended, unshuffled back in place, cls first, decoder_pos_embed added."""
    weight = state["patch_embed.proj.weight"]
    x = F.conv2d(images, weight, state["patch_embed.proj.bias"], stride=weight.shape[-1])
    x = x.flatten(2).transpose(1, 2)  # (B, L, d), row-major over the grid
    B, L, d = x.shape
    ids_keep, ids_restore = masking.ids_keep.to(x.device), masking.ids_restore.to(x.device)
    kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
    shuffled = torch.cat([kept, state["mask_token"].expand(B, L - kept.shape[1], d)], dim=1)
    x = torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))
    x = torch.cat([state["cls_token"].expand(B, 1, d), x], dim=1)
    return x + state["decoder_pos_embed"]


def compress(state: dict, layer: int, x: torch.Tensor, heads: int, attention: str = "explicit"):
    """An encoder layer's Z^{ℓ+½} = x + MSSA(LN₁(x))."""
    key = _encoder_key(layer, 0)
    return x + plain.mssa(state, key, plain.layer_norm(x, state, key + "norm"), heads, attention)


def sparsify(state: dict, layer: int, z: torch.Tensor, eta: float = 0.1, lam: float = 5.0):
    """(an encoder layer's Z^{ℓ+1} = ReLU(pre), (pre,)), the ISTA step at u = LN₂(z)."""
    pre = plain.ista_preactivation_at(state, _encoder_key(layer, 1), z, eta, lam)
    return F.relu(pre), (pre,)


def encoder_norm(state: dict, x: torch.Tensor) -> torch.Tensor:
    """The latent: the encoder's last output after ``norm``."""
    return plain.layer_norm(x, state, "norm", OUTER_NORM_EPS)


def unsparsify(state: dict, layer: int, z: torch.Tensor) -> torch.Tensor:
    """A decoder layer's linear step u = LN₁(z)·Wᵀ (no residual)."""
    key = _decoder_key(layer, 0)
    return F.linear(plain.layer_norm(z, state, key + "norm"), state[key + "fn.weight"])


def expand(state: dict, layer: int, u: torch.Tensor, heads: int, attention: str = "explicit"):
    """A decoder layer's output u − MSSA(LN₂(u))."""
    key = _decoder_key(layer, 1)
    return u - plain.mssa(state, key, plain.layer_norm(u, state, key + "norm"), heads, attention)


def head(state: dict, x: torch.Tensor) -> torch.Tensor:
    """(B, L + 1, d) -> (B, L, P²·C): decoder_norm, decoder_pred, cls dropped."""
    x = plain.layer_norm(x, state, "decoder_norm", OUTER_NORM_EPS)
    return F.linear(x, state["decoder_pred.weight"], state["decoder_pred.bias"])[:, 1:]


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, P·P·C), each patch ordered (p1, p2, c), by F.unfold."""
    C, P = images.shape[1], patch_size
    columns = F.unfold(images, kernel_size=P, stride=P)  # (B, C·P·P, L), ordered (c, p1, p2)
    return columns.unflatten(1, (C, P, P)).permute(0, 4, 2, 3, 1).flatten(2)


def loss(images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix_loss=False):
    """Mean over pixels of (pred − target)², then the mean over the masked patches (mask = 1)."""
    target = patchify(images, patch_size)
    if norm_pix_loss:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    mask = mask.to(pred)
    return (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()


def forward(
    state: dict,
    images: torch.Tensor,
    masking,
    *,
    heads: int,
    eta: float = 0.1,
    lam: float = 5.0,
    norm_pix_loss: bool = False,
    attention: str = "explicit",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, pred (B, L, P²·C)) of ``images`` under ``masking``."""
    x = embed(state, images, masking)
    for layer in range(depth(state)):
        x = sparsify(state, layer, compress(state, layer, x, heads, attention), eta, lam)[0]
    x = encoder_norm(state, x)
    for layer in range(depth(state)):
        x = expand(state, layer, unsparsify(state, layer, x), heads, attention)
    pred = head(state, x)
    patch_size = state["patch_embed.proj.weight"].shape[-1]
    return loss(images, pred, masking.mask, patch_size, norm_pix_loss), pred
