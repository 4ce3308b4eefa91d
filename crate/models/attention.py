"""Self-attention with query = key = value (MSSA's heads, docs/math.md §5) as one autograd function.

With W the head's tokens (N, p), S = s·WWᵀ, P = softmax_row(S) and O = PW, the gradient is

    dS = P ∘ (dP − rowsum(dP ∘ P)),  dP = dO·Wᵀ,   dW = Pᵀ·dO + (dS + dSᵀ)·(s·W)

because W plays query and key at once and S is symmetric in those roles: three N×N×p products
instead of the four of autograd's three-input path (dV, dP, dQ, dK), and P and W saved once.

dS is PyTorch's own softmax backward kernel, as in autograd. The cheaper correction
rowsum(dO ∘ O) (a sum over p, equal in exact arithmetic) is not used: with peaky attention
dP_ii − rowsum is a cancellation that only a correction computed from the same rounded dP and P
resolves; from the rounded O, bf16 gradients break the precision rule (verification/
test_symmetric_attention.py keeps that variant as a negative control, with its measured factors).

Under autocast W is cast to the autocast dtype, as autocast's matmuls would. Inside, autocast is
off and the dtypes are explicit: products in W's dtype, the softmax computed in float32 (float64 for
float64 input) and rounded to W's dtype for the P·W product and for saving.
"""

import torch


class SymmetricAttention(torch.autograd.Function):
    """softmax_row(s·WWᵀ)·W for W (..., N, p); ``symmetric_attention`` is the entry point."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, scale: float) -> torch.Tensor:
        device = w.device.type
        if torch.is_autocast_enabled(device):
            w = w.to(torch.get_autocast_dtype(device))  # as autocast's matmuls would
        wide = torch.promote_types(w.dtype, torch.float32)
        with torch.autocast(device, enabled=False):
            scores = (w @ w.transpose(-2, -1)).to(wide).mul_(scale)  # (..., N, N)
            p = scores.softmax(dim=-1).to(w.dtype)
            o = p @ w  # (..., N, p)
        ctx.save_for_backward(w, p)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do: torch.Tensor) -> tuple[torch.Tensor, None]:
        w, p = ctx.saved_tensors
        do = do.to(w.dtype)
        with torch.autocast(w.device.type, enabled=False):
            ds = torch._softmax_backward_data(do @ w.transpose(-2, -1), p, -1, p.dtype)  # (..., N, N)
            dw = p.transpose(-2, -1) @ do + (ds + ds.transpose(-2, -1)) @ (w * ctx.scale)
        return dw, None


def symmetric_attention(w: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax_row(scale·WWᵀ)·W, (..., N, p) → (..., N, p), with the symmetric backward."""
    return SymmetricAttention.apply(w, scale)
