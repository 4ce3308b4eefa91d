"""The sparse rate reduction objective (docs/math.md §2) and the energies behind CRATE's layer steps.

Public functions take token-major float64 tokens, (N, d) for one image or (B, N, d) for a batch, and
return one value per image. Inside, the algebra is the paper's column form: Z = Xᵀ ∈ R^{d×N}, tokens
are columns, Y_k = U_kᵀZ ∈ R^{p×N}, A_k = Y_kᵀY_k.
"""

from typing import NamedTuple

import torch

from ._checks import (
    require_dictionary,
    require_float64,
    require_nonnegative,
    require_positive,
    require_subspaces,
    require_tokens,
)


def _columns(X: torch.Tensor) -> torch.Tensor:
    return X.transpose(-1, -2)  # (..., N, d) -> (..., d, N)


def _half_logdet_gram(Y: torch.Tensor, a: float) -> torch.Tensor:
    """½ logdet(I_N + a·YᵀY) for Y of shape (..., m, N), Cholesky on the smaller side (Sylvester)."""
    m, n = Y.shape[-2:]
    gram = Y.transpose(-1, -2) @ Y if n <= m else Y @ Y.transpose(-1, -2)
    eye = torch.eye(gram.shape[-1], dtype=Y.dtype, device=Y.device)
    cholesky = torch.linalg.cholesky(eye + a * gram)
    return torch.log(torch.diagonal(cholesky, dim1=-2, dim2=-1)).sum(-1)


def _head_projections(Z: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """Y_k = U_kᵀZ for every head: (..., N, d) tokens, (K, d, p) bases -> (..., K, p, N)."""
    return torch.einsum("kdp,...dn->...kpn", U, _columns(Z))


def coding_rate(Z: torch.Tensor, eps: float) -> torch.Tensor:
    """R(Z) = ½ logdet(I_N + d/(Nε²)·ZᵀZ)  (docs/math.md §2), one value per image."""
    require_tokens("Z", Z)
    require_positive("eps", eps)
    n_tokens, dim = Z.shape[-2:]
    return _half_logdet_gram(_columns(Z), dim / (n_tokens * eps**2))


def compression_rate(Z: torch.Tensor, U: torch.Tensor, eps: float, normalize: bool = False) -> torch.Tensor:
    """R^c(Z; U) = Σ_k ½ logdet(I_N + p/(Nε²)·Y_kᵀY_k), Y_k = U_kᵀZ  (docs/math.md §2), one value per image.

    U has shape (K, d, p). ``normalize=True`` first scales every head-token (column of Y_k) to unit
    ℓ2 norm, the convention of the official measurement tool (docs/math.md §7; with eps = 0.1 it equals
    the tool's number).
    """
    require_tokens("Z", Z)
    require_subspaces(U, Z.shape[-1])
    require_positive("eps", eps)
    Y = _head_projections(Z, U)
    if normalize:
        Y = torch.nn.functional.normalize(Y, dim=-2)
    n_tokens, p = Z.shape[-2], U.shape[-1]
    return _half_logdet_gram(Y, p / (n_tokens * eps**2)).sum(-1)


def compression_rate_taylor2(Z: torch.Tensor, U: torch.Tensor, eps: float) -> torch.Tensor:
    """R^c₂(Z) = Σ_k (γ/2)·tr A_k − (γ²/4)·tr A_k²: R^c's 2nd-order Taylor polynomial (docs/math.md §3.3)."""
    require_tokens("Z", Z)
    require_subspaces(U, Z.shape[-1])
    require_positive("eps", eps)
    gamma = U.shape[-1] / (Z.shape[-2] * eps**2)
    Y = _head_projections(Z, U)
    A = Y.transpose(-1, -2) @ Y  # (..., K, N, N)
    trace_A = torch.diagonal(A, dim1=-2, dim2=-1).sum(-1)
    trace_A2 = (A * A.transpose(-1, -2)).sum((-2, -1))
    return (gamma / 2 * trace_A - gamma**2 / 4 * trace_A2).sum(-1)


def attention_energy(Q: torch.Tensor, C: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """E_s(Q; C) = (1/s)·Σ_j logsumexp_i(s⟨c_i, q_j⟩): the log-sum-exp energy of queries q_j against
    keys c_i (docs/math.md §3.4-1). Token-major (..., N, p) queries and keys; one value per image."""
    require_float64("Q", Q)
    require_float64("C", C)
    require_positive("temperature", temperature)
    logits = temperature * C @ _columns(Q)  # (..., keys i, queries j) = s·c_iᵀq_j
    return torch.logsumexp(logits, dim=-2).sum(-1) / temperature


def kernel_energy(Y: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """F_s(Y) = (1/(2s))·Σ_{i,j} exp(s⟨y_i, y_j⟩), the exponential-kernel energy (docs/math.md §3.4-3)."""
    require_float64("Y", Y)
    require_positive("temperature", temperature)
    return torch.exp(temperature * Y @ _columns(Y)).sum((-2, -1)) / (2 * temperature)


def compression_surrogate(
    Z: torch.Tensor, Z_bar: torch.Tensor, U: torch.Tensor, eps: float, temperature: float = 1.0
) -> torch.Tensor:
    """S(Z; Z̄) = Σ_k (γ/2)‖U_kᵀZ‖²_F − γ²·E_s(U_kᵀZ; U_kᵀZ̄)  (docs/math.md §3.4-2).

    Z̄ holds the keys; a gradient step on S with Z̄ = stop-gradient(Z) is the paper's softmax update.
    The first term's gradient is γ·Σ_k U_kU_kᵀZ, which is γZ only when U_[K] is square orthonormal.
    """
    require_tokens("Z", Z)
    require_tokens("Z_bar", Z_bar)
    require_subspaces(U, Z.shape[-1])
    require_positive("eps", eps)
    gamma = U.shape[-1] / (Z.shape[-2] * eps**2)
    queries = _columns(_head_projections(Z, U))  # (..., K, N, p), token-major per head
    keys = _columns(_head_projections(Z_bar, U))
    quadratic = (queries**2).sum((-3, -2, -1))
    return gamma / 2 * quadratic - gamma**2 * attention_energy(queries, keys, temperature).sum(-1)


class SparseRateReduction(NamedTuple):
    """Per-image terms of the sparse rate reduction objective R(Z) − R^c(Z; U) − λ‖Z‖₁."""

    objective: torch.Tensor  # R − R^c − λ·ℓ1
    coding_rate: torch.Tensor  # R(Z)
    compression_rate: torch.Tensor  # R^c(Z; U)
    l1: torch.Tensor  # ‖Z‖₁
    l0: torch.Tensor  # ‖Z‖₀, the count of non-zero entries (int64)


def sparse_rate_reduction(Z: torch.Tensor, U: torch.Tensor, eps: float, lam: float) -> SparseRateReduction:
    """R(Z) − R^c(Z; U) − λ‖Z‖₁ (docs/math.md §2, ℓ1 form), with the ℓ0 count reported beside it."""
    require_nonnegative("lam", lam)
    rate = coding_rate(Z, eps)
    compression = compression_rate(Z, U, eps)
    l1 = Z.abs().sum((-2, -1))
    l0 = (Z != 0).sum((-2, -1))
    return SparseRateReduction(rate - compression - lam * l1, rate, compression, l1, l0)


def lasso_data_term(A: torch.Tensor, X: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """½‖X − DA‖²_F in column form: data X (..., N, d) and codes A (..., N, m) token-major, D is d×m
    (m = d for CRATE's ISTA, m = 4d for CRATE-α's over-complete dictionary); one value per image."""
    return 0.5 * ((_columns(X) - D @ _columns(A)) ** 2).sum((-2, -1))


def lasso_objective(A: torch.Tensor, X: torch.Tensor, D: torch.Tensor, lam: float) -> torch.Tensor:
    """f(A) = ½‖X − DA‖²_F + λ‖A‖₁ + 𝟙{A ≥ 0}  (docs/math.md §4; over-complete D ∈ R^{d×m} as CRATE-α's):
    +inf for an image with a negative code."""
    require_tokens("A", A)
    require_tokens("X", X)
    require_dictionary(D, X.shape[-1], square=False)
    expected = (*X.shape[:-1], D.shape[1])
    if A.shape != expected:
        raise ValueError(
            f"A must have the same shape as X but with m = {D.shape[1]} codes per token (D's columns): "
            f"expected {expected}, got {tuple(A.shape)}"
        )
    require_nonnegative("lam", lam)
    value = lasso_data_term(A, X, D) + lam * A.abs().sum((-2, -1))
    infeasible = (A < 0).any(-1).any(-1)
    return torch.where(infeasible, torch.full_like(value, torch.inf), value)
