"""The layers both CRATE families share: the patch embedding of CRATE, multi-head subspace
self-attention (MSSA), drop path. Tokens are (B, N, d) throughout."""

import contextlib
import os

import torch
import torch.nn.functional as F
from torch import nn

from .attention import symmetric_attention

NORM_EPS = 1e-5  # PyTorch's default: every LayerNorm of the released CRATE, and CRATE-α's head


def pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class PatchEmbed(nn.Module):
    """Patches flattened (row in patch, column in patch, channel), then LayerNorm → Linear → LayerNorm."""

    def __init__(
        self,
        img_size: tuple[int, int],
        patch_size: int,
        in_chans: int,
        dim: int,
        strict_img_size: bool = True,
    ):
        super().__init__()
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.strict_img_size = strict_img_size  # False: any size patch_size divides (timm's name)
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        patch_dim = patch_size * patch_size * in_chans
        self.norm_in = nn.LayerNorm(patch_dim, eps=NORM_EPS)
        self.proj = nn.Linear(patch_dim, dim)
        self.norm_out = nn.LayerNorm(dim, eps=NORM_EPS)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # sizes from the configuration (the model checked the images), so that a traced or exported
        # graph has only the batch size free; the images' own grid when not strict
        B, C, P = images.shape[0], self.in_chans, self.patch_size
        h, w = self.grid_size
        if not self.strict_img_size:
            h, w = images.shape[2] // P, images.shape[3] // P
        grid = images.reshape(B, C, h, P, w, P)  # (B, C, h, p1, w, p2)
        patches = grid.permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, P * P * C)  # (B, n, p1·p2·c)
        return self.norm_out(self.proj(self.norm_in(shifted(patches))))  # (B, n, d)


@torch.fx.wrap
def shifted(patches: torch.Tensor) -> torch.Tensor:
    """Each patch less its first pixel, in float32 and float64: LayerNorm is invariant to the shift,
    and it makes a constant patch (an image's flat background) exactly zero, so that its normalised
    output is exactly 0 however the mean is summed. Unshifted, a compiled LayerNorm's mean leaves a
    rounding residue there that 1/√eps ≈ 316 amplifies (float32 on Fashion-MNIST: 5.3e-4 against
    eager's 1.1e-7, which the gate's rule refused); nearly flat patches gain alike (eager's float32
    error 26× smaller). Half precision LayerNorms compute in float32 already, where the shift would
    only add a rounding. A torch.fx leaf: a traced model chooses by dtype when it runs."""
    if patches.dtype not in (torch.float32, torch.float64):
        return patches
    return patches - patches[..., :1]


def exporting() -> bool:
    """Whether torch.export is tracing: torch.compiler.is_exporting() as torch 2.14 answers it, on every
    version. Before 2.14, dynamo folded that call to True under torch.compile as well (pytorch#176347),
    which sent compiled training off the Triton kernel and symmetric_attention; 2.14's dynamo reads
    the flag that torch.export sets, and so does this."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else flag


@torch.fx.wrap
def subspace_attention(w: torch.Tensor, scale: float, fused: bool) -> torch.Tensor:
    """softmax_row(s·w_k w_kᵀ)·w_k per head: (B, K, N, p) -> (B, K, N, p), query = key = value = w.

    ``fused``: with the kernel enabled (see MSSA) and a gradient on CUDA, the Triton kernels of
    mssa_kernel.py (up to 256 tokens, heads up to 64 wide, not float64); else
    F.scaled_dot_product_attention where no gradient flows or its backward is accurate, else
    symmetric_attention; not fused, and under TorchScript and torch.export, the explicit
    matmul-softmax path (see MSSA for why). A leaf of torch.fx traces (torch.fx.wrap), so that a
    traced model makes this choice when it runs, as the eager one does. The autograd functions stay
    behind is_scripting (TorchScript cannot compile one) and exporting() (an exported graph
    differentiates plain operations only).
    """
    autograd = torch.is_grad_enabled() and w.requires_grad
    if fused and not torch.jit.is_scripting():
        if autograd and not exporting() and _kernel_selected(w):
            return _kernel_attention(w, scale)
    if fused and (not autograd or _fused_backward_is_accurate(w)):
        return F.scaled_dot_product_attention(w, w, w, scale=scale)
    if fused and not torch.jit.is_scripting():
        if not exporting():
            return symmetric_attention(w, scale)
    return ((w @ w.transpose(-2, -1)) * scale).softmax(dim=-1) @ w


KERNEL_VARIABLE = "CRATE_MSSA_KERNEL"  # =1 when crate is imported: CUDA training through mssa_kernel.py
KERNEL_MAX_TOKENS, KERNEL_MAX_HEAD_DIM = 256, 64  # mssa_kernel's MAX_TOKENS and MAX_HEAD_DIM
# A module global, not the environment read at each call: torch.compile guards a global's value (a
# compiled step recompiles when it changes) but folds an environment read into its graph unguarded.
_kernel_on = os.environ.get(KERNEL_VARIABLE) == "1"


@contextlib.contextmanager
def kernel_enabled(enabled: bool = True):
    """Within the block, MSSA's CUDA training path is the Triton kernel (True) or not (False),
    whatever CRATE_MSSA_KERNEL said; the previous setting after it."""
    global _kernel_on
    previous, _kernel_on = _kernel_on, enabled
    try:
        yield
    finally:
        _kernel_on = previous


def _kernel_selected(w: torch.Tensor) -> bool:
    return _kernel_on and _kernel_fits(w)


def _kernel_fits(w: torch.Tensor) -> bool:
    small = w.shape[-2] <= KERNEL_MAX_TOKENS and w.shape[-1] <= KERNEL_MAX_HEAD_DIM
    return w.is_cuda and w.dtype != torch.float64 and small


def _kernel_attention(w: torch.Tensor, scale: float) -> torch.Tensor:
    from .mssa_kernel import fused_symmetric_attention  # needs Triton: imported only when chosen

    return fused_symmetric_attention(w, scale)


def _fused_backward_is_accurate(w: torch.Tensor) -> bool:
    return w.is_cuda and (w.dtype == torch.float16 or w.dtype == torch.bfloat16)  # see MSSA


class MSSA(nn.Module):
    """Multi-head subspace self-attention: query = key = value = y·U_k per head (docs/math.md §5).

    ``fused_attn`` uses F.scaled_dot_product_attention for inference and for training in float16 or
    bfloat16 (autocast included) on CUDA, and ``symmetric_attention`` (attention.py: one backward
    for q = k = v, three N×N×p products instead of four) for the other training.
    ``fused_attn=False`` takes the explicit matmul-softmax path, which states the math and is the
    in-model oracle. Why: SDPA's backward must keep the precision rule of docs/math.md §8, and
    verification/test_symmetric_attention.py finds that CUDA's flash and memory-efficient kernels
    keep it in float16 and bfloat16 only; in float32, and on the CPU, their gradients break it with
    peaky attention (the measured factors and speeds: README "Using the fast model").
    Opt-in, default off: the environment variable CRATE_MSSA_KERNEL=1 (read when crate is imported)
    or ``kernel_enabled()`` makes CUDA training (any dtype but float64) run
    crate/models/mssa_kernel.py's fused Triton kernels instead (chosen at every call, compiled or
    not, so a run's verification gate checks the model with them; verified under Triton's
    interpreter on the CPU, to become the default only where a GPU run shows it keeps the rule and
    wins).
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
