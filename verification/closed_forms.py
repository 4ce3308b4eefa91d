"""The closed forms that the reference's autograd results are checked against (docs/math.md §3, §4).

Token-major: tokens X (B, N, d), per-head tokens W_k = X·U_k (B, K, N, p), γ = p/(Nε²).
These live here, not in reference/, so that the reference cannot pass by restating them.
"""

import torch


def head_tokens(X: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bnd,kdp->bknp", X, U)  # (B, K, N, p)


def gamma(X: torch.Tensor, U: torch.Tensor, eps: float) -> float:
    return U.shape[-1] / (X.shape[-2] * eps**2)


def _gram_plus_identity(W: torch.Tensor, coefficient: float) -> torch.Tensor:
    eye = torch.eye(W.shape[-2], dtype=W.dtype)
    return eye + coefficient * W @ W.transpose(-1, -2)  # (B, K, N, N)


def exact_compression_gradient(X: torch.Tensor, U: torch.Tensor, eps: float) -> torch.Tensor:
    """∇_X R^c = γ Σ_k (I_N + γ W_kW_kᵀ)⁻¹ W_k U_kᵀ  (docs/math.md §3.1, token-major)."""
    g, W = gamma(X, U, eps), head_tokens(X, U)
    per_head = torch.linalg.solve(_gram_plus_identity(W, g), W)
    return g * torch.einsum("bknp,kdp->bnd", per_head, U)


def neumann_compression_gradient(X: torch.Tensor, U: torch.Tensor, eps: float) -> torch.Tensor:
    """γ Σ_k (I_N − γ W_kW_kᵀ) W_k U_kᵀ: (I + γA)⁻¹ replaced by I − γA  (docs/math.md §3.3)."""
    g, W = gamma(X, U, eps), head_tokens(X, U)
    return g * torch.einsum("bknp,kdp->bnd", _gram_plus_identity(W, -g) @ W, U)


def ssa(W: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax_row(s·W Wᵀ)·W, the token-major SSA of docs/math.md §3.5."""
    return torch.softmax(temperature * W @ W.transpose(-1, -2), dim=-1) @ W


def paper_mssa(X: torch.Tensor, U: torch.Tensor, eps: float, temperature: float = 1.0) -> torch.Tensor:
    """MSSA(Z|U) = γ Σ_k U_k SSA_k, token-major γ Σ_k SSA(W_k) U_kᵀ  (docs/math.md §3.4)."""
    W = head_tokens(X, U)
    return gamma(X, U, eps) * torch.einsum("bknp,kdp->bnd", ssa(W, temperature), U)


def ista_closed_form(X: torch.Tensor, D: torch.Tensor, eta: float, lam: float) -> torch.Tensor:
    """ReLU(X + η Dᵀ(X − DX) − ηλ) in the paper's column form, returned token-major  (docs/math.md §4)."""
    Xc = X.transpose(-1, -2)
    return torch.relu(Xc + eta * D.T @ (Xc - D @ Xc) - eta * lam).transpose(-1, -2)


def subspace_stack(U: torch.Tensor) -> torch.Tensor:
    """U_[K] = [U_1 … U_K] of shape (d, K·p)."""
    return U.transpose(0, 1).flatten(1)


def overcomplete_first_step(X: torch.Tensor, D: torch.Tensor, eta: float, lam: float) -> torch.Tensor:
    """ReLU(η Dᵀu − ηλ) per token u (columns of Xᵀ), D ∈ R^{d×m}, returned token-major (B, N, m):
    the first proximal-gradient step from A₀ = 0, the one-sided soft threshold of ηDᵀu
    (docs/crate-alpha.md §2)."""
    return torch.relu(eta * D.T @ X.transpose(-1, -2) - eta * lam).transpose(-1, -2)
