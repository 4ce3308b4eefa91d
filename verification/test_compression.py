"""The compression objective R^c, its gradient and the descent theorem (docs/math.md §2, §3.1–3.3).

Rows 1, 3, 4, 5, 6, 18 and 19 of the property table.
"""

import torch
from hypothesis import example, given
from hypothesis import strategies as st

import reference
from verification.asserts import assert_within, max_abs
from verification.closed_forms import (
    exact_compression_gradient,
    head_tokens,
    neumann_compression_gradient,
    subspace_stack,
)
from verification.strategies import HeadProblem, head_problems, log_uniform, step_fractions, token_matrices

U_ROUNDING = 2.0**-53


def _head_conditioning(problem: HeadProblem) -> torch.Tensor:
    """c = 1 + γ·max_k ‖W_k‖₂² per image: the condition number of the worst I + γA_k."""
    W = head_tokens(problem.Z, problem.U)
    return 1 + problem.gamma * torch.linalg.matrix_norm(W, ord=2).amax(-1) ** 2


def _per_image_norm(tensor: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(tensor.flatten(1), dim=-1)


# Row 1 ------------------------------------------------------------------------------------------
@given(head_problems(scales=(1e-4, 1e4), eps=(0.01, 3.0)))
@example(
    HeadProblem(batch=1, tokens=2, dim=1, heads=1, head_dim=1, seed=0, scale=1e4, eps=0.05, orthonormal=False)
)  # the case that breaks a flat 1e-9 relative tolerance
def test_autograd_compression_gradient_equals_closed_form(problem):
    """autograd ∇R^c = γ Σ_k (I + γW_kW_kᵀ)⁻¹ W_k U_kᵀ, relative error <= 1e-13·(1 + γ max‖W_k‖₂²)."""
    autograd = reference.compression_gradient(problem.Z, problem.U, problem.eps, mode="exact")
    closed = exact_compression_gradient(problem.Z, problem.U, problem.eps)
    relative = _per_image_norm(autograd - closed) / _per_image_norm(closed)
    ratio = (relative / (1e-13 * _head_conditioning(problem))).max().item()
    assert_within(ratio, 1.0, "relative gradient error / (1e-13·conditioning)")


# Row 3 ------------------------------------------------------------------------------------------
def _half_logdet(gram: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype)
    return 0.5 * torch.linalg.slogdet(eye + gram).logabsdet


@given(head_problems(scales=(1e-1, 10.0)))
def test_rates_are_equal_on_both_sides_of_the_gram(problem):
    """Sylvester: logdet(I_N + aYᵀY) = logdet(I_p + aYYᵀ); the reference (which factors the smaller
    side) equals both. Relative 1e-12 plus an absolute 1e-13·n floor for logdets near 0, where
    rounding the unit diagonal alone costs about n·u."""
    Z, eps = problem.Z, problem.eps
    n_tokens, dim = Z.shape[-2:]
    a = dim / (n_tokens * eps**2)
    token_side = _half_logdet(a * Z @ Z.transpose(-1, -2))
    feature_side = _half_logdet(a * Z.transpose(-1, -2) @ Z)
    floor = 1e-13 * max(n_tokens, dim)
    assert_within(max_abs(token_side - feature_side), 1e-12 * max_abs(token_side) + floor, "N side vs d side")
    rate = reference.coding_rate(Z, eps)
    assert_within(max_abs(rate - token_side), 1e-12 * max_abs(token_side) + floor, "coding_rate vs N side")

    W = head_tokens(Z, problem.U)
    head_side = _half_logdet(problem.gamma * W @ W.transpose(-1, -2)).sum(-1)
    compression = reference.compression_rate(Z, problem.U, eps)
    bound = 1e-12 * max_abs(head_side) + floor * problem.heads
    assert_within(max_abs(compression - head_side), bound, "compression_rate vs N side")


# Row 4 ------------------------------------------------------------------------------------------
@given(token_matrices(scales=(1e-2, 10.0)), log_uniform(1e-3, 1e2))
def test_neumann_residual_norm_is_exact(W, gamma):
    """‖(I+γA)⁻¹ − (I−γA)‖₂ = max_i (γλ_i)²/(1+γλ_i) <= min((γ‖A‖)², γ‖A‖) for A = WWᵀ ⪰ 0;
    absolute tolerance 1e-13·(1 + γ‖A‖)², since the difference cancels catastrophically."""
    A = W @ W.transpose(-1, -2)
    eye = torch.eye(A.shape[-1], dtype=A.dtype)
    residual = torch.linalg.matrix_norm(torch.linalg.inv(eye + gamma * A) - (eye - gamma * A), ord=2)
    eigenvalues = torch.linalg.eigvalsh(A).clamp_min(0)
    predicted = ((gamma * eigenvalues) ** 2 / (1 + gamma * eigenvalues)).amax(-1)
    gamma_norm = gamma * eigenvalues.amax(-1)
    tolerance = 1e-13 * (1 + gamma_norm) ** 2
    assert_within((((residual - predicted).abs()) / tolerance).max().item(), 1.0, "residual norm / tolerance")
    bound = torch.minimum(gamma_norm**2, gamma_norm)
    assert_within(((predicted - bound) / tolerance).max().item(), 1.0, "(predicted − bound) / tolerance")


# Row 5 ------------------------------------------------------------------------------------------
def _neumann_relative_error(problem: HeadProblem) -> tuple[torch.Tensor, torch.Tensor]:
    exact = reference.compression_gradient(problem.Z, problem.U, problem.eps, mode="exact")
    neumann = reference.compression_gradient(problem.Z, problem.U, problem.eps, mode="taylor2")
    relative = _per_image_norm(neumann - exact) / _per_image_norm(exact)
    W = head_tokens(problem.Z, problem.U)
    bound = (problem.gamma * torch.linalg.matrix_norm(W, ord=2).amax(-1) ** 2) ** 2
    return relative, bound


@given(st.one_of(head_problems(max_heads=1), head_problems(orthonormal=True)))
def test_neumann_gradient_error_is_bounded(problem):
    """‖∇_Neumann − ∇‖/‖∇‖ <= (γ max_k‖W_k‖₂²)² for one head with any U, or orthonormal U_[K];
    ratio <= 1 + 1e-6, plus the autograd gradient's own accuracy (row 1) as a floor."""
    relative, bound = _neumann_relative_error(problem)
    floor = 1e-13 * _head_conditioning(problem)
    assert_within(((relative - floor) / bound).max().item(), 1 + 1e-6, "relative error / bound")


@given(head_problems(max_heads=1, max_dim=1, scales=(1e-1, 3.0)))
def test_neumann_gradient_bound_is_attained_by_rank_one_heads(problem):
    """For a rank-one head (p = 1) the bound holds with equality: |relative − bound| <= 1e-6·bound,
    plus the autograd gradient's accuracy (row 1) as a floor for tiny γ‖W‖²."""
    relative, bound = _neumann_relative_error(problem)
    floor = 1e-13 * _head_conditioning(problem)
    ratio = ((relative - bound).abs() / (1e-6 * bound + floor)).max().item()
    assert_within(ratio, 1.0, "|relative error − bound| / (1e-6·bound + floor)")


# Row 6 ------------------------------------------------------------------------------------------
@given(head_problems())
def test_neumann_step_is_autograd_of_taylor_polynomial(problem):
    """autograd ∇R^c₂ = γ Σ_k (I − γW_kW_kᵀ) W_k U_kᵀ within 1e-12 × the entry-wise size of its two
    terms, γ Σ|W_k||U_k|ᵀ + γ² Σ|W_k||W_k|ᵀ|W_k||U_k|ᵀ (which bounds the rounding of either sum)."""
    autograd = reference.compression_gradient(problem.Z, problem.U, problem.eps, mode="taylor2")
    closed = neumann_compression_gradient(problem.Z, problem.U, problem.eps)
    W, U, g = head_tokens(problem.Z, problem.U).abs(), problem.U.abs(), problem.gamma
    size = g * torch.einsum("bknp,kdp->bnd", W, U)
    size = size + g**2 * torch.einsum("bknp,kdp->bnd", W @ W.transpose(-1, -2) @ W, U)
    assert_within(max_abs(autograd - closed), 1e-12 * max_abs(size), "taylor2 autograd vs closed form")


# Row 18 -----------------------------------------------------------------------------------------
def _lipschitz(problem: HeadProblem) -> float:
    return problem.gamma * torch.linalg.matrix_norm(subspace_stack(problem.U), ord=2).item() ** 2


@given(head_problems(scales=(1e-2, 30.0)), step_fractions())
def test_exact_compression_step_decreases_rate_sufficiently(problem, fraction):
    """For κ <= 2/L, L = γ‖U_[K]‖₂²: R^c(Z − κ∇) <= R^c(Z) − κ(1 − Lκ/2)‖∇‖², allowance 1e-11(1+|R^c|)."""
    L = _lipschitz(problem)
    kappa = fraction * 2 / L
    Z, U, eps = problem.Z, problem.U, problem.eps
    before = reference.compression_rate(Z, U, eps)
    after = reference.compression_rate(reference.compression_step(Z, U, eps, kappa, mode="exact"), U, eps)
    gradient = reference.compression_gradient(Z, U, eps, mode="exact")
    guaranteed = kappa * (1 - L * kappa / 2) * _per_image_norm(gradient) ** 2
    excess = after - (before - guaranteed)
    assert_within((excess / (1e-11 * (1 + before.abs()))).max().item(), 1.0, "excess / allowance")


def test_too_long_compression_step_can_increase_rate():
    """Negative control for row 18: with κ = 20/L the rate rises for some inputs (docs/math.md: 222/400)."""
    increases = 0
    for seed in range(20):
        problem = HeadProblem(
            batch=1, tokens=8, dim=6, heads=2, head_dim=3, seed=seed, scale=1.0, eps=0.5, orthonormal=False
        )
        Z, U, eps = problem.Z, problem.U, problem.eps
        stepped = reference.compression_step(Z, U, eps, 20 / _lipschitz(problem), mode="exact")
        increases += int(reference.compression_rate(stepped, U, eps) > reference.compression_rate(Z, U, eps))
    assert increases > 0


# Row 19 -----------------------------------------------------------------------------------------
@given(head_problems(max_dim=5, max_tokens=6, max_batch=1, scales=(1e-2, 10.0)))
def test_compression_rate_hessian_is_bounded_by_lipschitz_constant(problem):
    """λ_max(∇²R^c) <= L(1 + 1e-9), L = γ‖U_[K]‖₂²."""
    Z, U, eps = problem.Z[0], problem.U, problem.eps
    hessian = torch.autograd.functional.hessian(
        lambda flat: reference.compression_rate(flat.reshape(Z.shape), U, eps), Z.flatten()
    )
    largest = torch.linalg.eigvalsh((hessian + hessian.T) / 2).max().item()
    assert_within(largest / _lipschitz(problem), 1 + 1e-9, "max Hessian eigenvalue / L")
