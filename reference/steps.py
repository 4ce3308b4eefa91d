"""CRATE's layer steps, each derived from an objective by torch.autograd (docs/math.md §3, §4, §6a).

The compression step is a gradient step on R^c (or on its Taylor polynomial, or on the softmax
surrogate); CRATE-MAE's decoder takes the same step the other way (the expansion step, docs/crate-mae.md);
the sparsification step is one proximal-gradient step on the non-negative LASSO. No
closed-form gradient appears here: verification/ compares these autograd results with the closed forms.
"""

import torch

from ._checks import (
    require_dictionary,
    require_float64,
    require_nonnegative,
    require_positive,
    require_tokens,
)
from .objective import compression_rate, compression_rate_taylor2, compression_surrogate, lasso_data_term

COMPRESSION_MODES = ("exact", "taylor2", "softmax")


def compression_gradient(
    Z: torch.Tensor, U: torch.Tensor, eps: float, mode: str = "exact", temperature: float = 1.0
) -> torch.Tensor:
    """∇_Z of R^c ("exact"), of R^c₂ ("taylor2") or of S(Z; stop-gradient(Z)) ("softmax"), by autograd.

    Differentiable in Z (and U) when they require grad: the gradient graph is then kept.
    """
    if mode not in COMPRESSION_MODES:
        raise ValueError(f"mode must be one of {COMPRESSION_MODES}, got {mode!r}")
    require_tokens("Z", Z)
    differentiable = Z.requires_grad or U.requires_grad
    Z_var = Z.clone() if Z.requires_grad else Z.detach().requires_grad_(True)  # a node of its own
    with torch.enable_grad():
        if mode == "exact":
            value = compression_rate(Z_var, U, eps)
        elif mode == "taylor2":
            value = compression_rate_taylor2(Z_var, U, eps)
        else:
            # keys: Z itself, outside Z_var's path, so the gradient below does not flow through them
            value = compression_surrogate(Z_var, Z, U, eps, temperature)
        # images are independent, so the gradient of the sum is the per-image gradient
        (gradient,) = torch.autograd.grad(value.sum(), Z_var, create_graph=differentiable)
    return gradient


def compression_step(
    Z: torch.Tensor, U: torch.Tensor, eps: float, kappa: float, mode: str = "exact", temperature: float = 1.0
) -> torch.Tensor:
    """Z − κ·∇(objective of ``mode``): one compression (MSSA) step of the paper, docs/math.md §6a."""
    require_positive("kappa", kappa)
    return Z - kappa * compression_gradient(Z, U, eps, mode, temperature)


def expansion_step(
    Z: torch.Tensor, U: torch.Tensor, eps: float, kappa: float, mode: str = "exact", temperature: float = 1.0
) -> torch.Tensor:
    """Z + κ·∇(objective of ``mode``): one expansion step of CRATE-MAE's decoder, gradient ascent on R^c
    or its surrogate, the compression step reversed (docs/crate-mae.md)."""
    require_positive("kappa", kappa)
    return Z + kappa * compression_gradient(Z, U, eps, mode, temperature)


def nonnegative_soft_threshold(v: torch.Tensor, t: float) -> torch.Tensor:
    """prox of t·|·| + 𝟙{· ≥ 0}, entry-wise: max(v − t, 0). Derived in reference.symbolic."""
    return torch.clamp_min(v - t, 0.0)


def proximal_gradient_steps(
    X: torch.Tensor, D: torch.Tensor, eta: float, lam: float, steps: int, start: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """``steps`` proximal-gradient steps on ½‖X − DA‖² + λ‖A‖₁ + 𝟙{A ≥ 0} with D ∈ R^{d×m}, from A₀ =
    ``start`` (zeros when None): the iterates [A₁, …, A_steps], each (B, N, m).

    Each step takes the data term's gradient from autograd, then the non-negative soft-threshold prox
    with threshold ηλ. CRATE's ISTA is one step from A₀ = X (m = d); CRATE-α's ODL block is two steps
    from A₀ = 0 with m = 4d (docs/crate-alpha.md).
    """
    require_tokens("X", X)
    require_dictionary(D, X.shape[-1], square=False)
    require_positive("eta", eta)
    require_nonnegative("lam", lam)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    codes_shape = (*X.shape[:-1], D.shape[1])
    if start is None:
        start = X.new_zeros(codes_shape)
    else:
        require_float64("start", start)
    if start.shape != codes_shape:
        raise ValueError(f"start must have the codes' shape {codes_shape}, got {tuple(start.shape)}")
    differentiable = X.requires_grad or D.requires_grad or start.requires_grad
    iterates, A = [], start
    for _ in range(steps):
        A_var = A.clone() if A.requires_grad else A.detach().requires_grad_(True)  # a node of its own
        with torch.enable_grad():
            (gradient,) = torch.autograd.grad(
                lasso_data_term(A_var, X, D).sum(), A_var, create_graph=differentiable
            )
        A = nonnegative_soft_threshold((A_var if differentiable else A) - eta * gradient, eta * lam)
        iterates.append(A)
    return iterates


def ista_step(X: torch.Tensor, D: torch.Tensor, eta: float, lam: float) -> torch.Tensor:
    """One proximal-gradient step on ½‖X − DA‖² + λ‖A‖₁ + 𝟙{A ≥ 0}, warm-started at A = X  (docs/math.md §4):
    CRATE's ISTA block, with its square dictionary D ∈ R^{d×d}."""
    require_tokens("X", X)
    require_dictionary(D, X.shape[-1])
    return proximal_gradient_steps(X, D, eta, lam, steps=1, start=X)[0]
