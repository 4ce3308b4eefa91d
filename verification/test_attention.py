"""What the softmax attention step is, exactly (docs/math.md §3.4, §3.5): rows 7–12 of the property table.

SSA is the query-gradient of a log-sum-exp energy with the keys held fixed (row 7; without the
stop-gradient it is not, row 8), a positively preconditioned gradient of an exponential-kernel
energy (row 9), and not the gradient of any scalar function (row 10). The paper's softmax update is
one autograd step on a stop-gradient surrogate (row 11), and the paper's column softmax is the
token-major row softmax (row 12).
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import reference
from verification.asserts import assert_close, max_abs, relative_difference
from verification.closed_forms import head_tokens, neumann_compression_gradient, paper_mssa, ssa
from verification.strategies import head_problems, log_uniform, randn, step_fractions, token_matrices


def _query_gradient(W: torch.Tensor, temperature: float, stop_gradient: bool) -> torch.Tensor:
    """∇_Q E_s(Q; C) at Q = C = W, the keys C held fixed (stop_gradient) or the same tensor as Q.

    Differentiable in W when W requires grad (the inner gradient is taken with respect to Q only).
    """
    queries = W.clone() if W.requires_grad else W.clone().requires_grad_(True)
    keys = W if stop_gradient else queries
    energy = reference.attention_energy(queries, keys, temperature).sum()
    (gradient,) = torch.autograd.grad(energy, queries, create_graph=W.requires_grad)
    return gradient


def _ssa_tolerance(W: torch.Tensor, temperature: float) -> float:
    largest_norm2 = (W**2).sum(-1).max().item()
    return 1e-12 * (1 + max_abs(W)) * (1 + temperature * largest_norm2)


# Row 7 ------------------------------------------------------------------------------------------
@given(token_matrices(), log_uniform(0.1, 3.0))
def test_ssa_is_query_gradient_of_logsumexp_energy(W, temperature):
    """∇_Q E_s(Q; sg(C))|_{Q=C=W} = softmax_row(sW Wᵀ)·W, within 1e-12(1+‖W‖_max)(1+s max‖w‖²)."""
    gradient = _query_gradient(W, temperature, stop_gradient=True)
    assert_close(gradient, ssa(W, temperature), _ssa_tolerance(W, temperature), "∇_Q E vs SSA")


# Row 8 ------------------------------------------------------------------------------------------
@given(token_matrices(), log_uniform(0.1, 3.0))
def test_energy_gradient_without_stop_gradient_adds_key_path(W, temperature):
    """Without the stop-gradient, autograd gives (P + Pᵀ)·W, P = softmax_row(sW Wᵀ)."""
    P = torch.softmax(temperature * W @ W.transpose(-1, -2), dim=-1)
    gradient = _query_gradient(W, temperature, stop_gradient=False)
    assert_close(gradient, (P + P.transpose(-1, -2)) @ W, _ssa_tolerance(W, temperature), "(P + Pᵀ)W")


@pytest.mark.parametrize("seed", range(5))
def test_energy_gradient_without_stop_gradient_is_not_ssa(seed):
    """Negative control: the key path changes the result by far more than rounding (docs/math.md: 132%)."""
    W = randn((1, 5, 3), torch.Generator().manual_seed(seed))
    difference = relative_difference(_query_gradient(W, 1.0, stop_gradient=False), ssa(W))
    assert difference > 0.1, f"gradient without stop-gradient is within {difference:.3g} of SSA"


# Row 9 ------------------------------------------------------------------------------------------
@given(token_matrices(scales=(1e-2, 2.0)), log_uniform(0.1, 3.0))
def test_ssa_is_preconditioned_kernel_energy_gradient(W, temperature):
    """SSA_s(W) scaled per token by c_j = Σ_i exp(s⟨w_i, w_j⟩) equals ∇F_s(W); 1e-12 relative.
    Scales keep s‖w‖² <= ~60, far from exp overflow."""
    Y = W.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(reference.kernel_energy(Y, temperature).sum(), Y)
    c = torch.exp(temperature * W @ W.transpose(-1, -2)).sum(-1, keepdim=True)  # (B, N, 1)
    assert_close(c * ssa(W, temperature), gradient, 1e-12 * max_abs(gradient), "diag(c)·SSA vs ∇F_s")


# Row 10 -----------------------------------------------------------------------------------------
def _jacobian_asymmetry(gradient_map, W: torch.Tensor) -> float:
    J = torch.autograd.functional.jacobian(gradient_map, W).reshape(W.numel(), W.numel())
    return (torch.linalg.matrix_norm(J - J.T) / torch.linalg.matrix_norm(J)).item()


@pytest.mark.parametrize("seed", range(5))
def test_ssa_is_not_the_gradient_of_any_energy(seed):
    """Negative control: SSA's Jacobian is not symmetric (> 0.1; docs/math.md 0.56 at p=3, N=5), whereas a
    true gradient map, here the Taylor (Neumann) gradient ∇R^c₂, has a symmetric Jacobian (a Hessian)."""
    W = randn((5, 3), torch.Generator().manual_seed(seed))
    asymmetry = _jacobian_asymmetry(lambda Y: _query_gradient(Y[None], 1.0, stop_gradient=True)[0], W)
    assert asymmetry > 0.1, f"SSA Jacobian asymmetry only {asymmetry:.3g}"
    identity_basis = torch.eye(3, dtype=torch.float64)[None]
    neumann = _jacobian_asymmetry(lambda Y: neumann_compression_gradient(Y[None], identity_basis, 1.0)[0], W)
    assert neumann < 1e-12, f"a true gradient map had Jacobian asymmetry {neumann:.3g}"


# Row 11 -----------------------------------------------------------------------------------------
@given(
    head_problems(complete=True, scales=(1e-2, 3.0), eps=(0.3, 3.0)),
    step_fractions(),
    st.sampled_from([1.0, 0.5, 0.125]),
)
def test_surrogate_step_is_paper_softmax_update(problem, fraction, temperature):
    """Z − κ∇_Z S(Z; sg(Z)) = (1 − κγ)Z + κγ·MSSA(Z|U) for square orthonormal U_[K]; 1e-12 × the
    size of the two terms. κγ ranges over (0, 1]."""
    Z, U, eps = problem.Z, problem.U, problem.eps
    kappa = fraction / problem.gamma
    stepped = reference.compression_step(Z, U, eps, kappa, mode="softmax", temperature=temperature)
    mssa = paper_mssa(Z, U, eps, temperature)
    expected = (1 - kappa * problem.gamma) * Z + kappa * problem.gamma * mssa
    size = max_abs(Z) + kappa * problem.gamma * max_abs(mssa)
    assert_close(stepped, expected, 1e-12 * size, "surrogate step vs paper update")


# Row 12 -----------------------------------------------------------------------------------------
def _column_ssa(Zk: torch.Tensor, axis: int) -> torch.Tensor:
    """Z_k·softmax(Z_kᵀZ_k) in column form (p, N), normalising axis 0 (columns) or 1 (rows)."""
    return Zk @ torch.softmax(Zk.T @ Zk, dim=axis)


@given(token_matrices(batch=1))
def test_column_softmax_equals_token_major_row_softmax(W):
    """(Z_k softmax_col(Z_kᵀZ_k))ᵀ = softmax_row(W_kW_kᵀ)W_k (the logits are symmetric); 1e-12.
    The official token-major MSSA, with one head and no output projection, computes the same."""
    column_form = _column_ssa(W[0].T, axis=0).T[None]
    assert_close(ssa(W), column_form, 1e-12 * (1 + max_abs(W)), "token-major vs column form")
    p = W.shape[-1]
    official = reference.official.MSSA(p, heads=1, head_dim=p)
    official.scale = 1.0
    with torch.no_grad():
        official.qkv.weight.copy_(torch.eye(p, dtype=torch.float64))
    assert_close(official(W).detach(), column_form, 1e-12 * (1 + max_abs(W)), "official MSSA vs column form")


@pytest.mark.parametrize("seed", range(5))
def test_softmax_over_the_other_axis_is_a_different_operator(seed):
    """Negative control: normalising the rows in the column formula differs (docs/math.md: up to 114%)."""
    Zk = randn((4, 7), torch.Generator().manual_seed(seed))
    difference = relative_difference(_column_ssa(Zk, axis=1), _column_ssa(Zk, axis=0))
    assert difference > 0.05, f"row and column softmax within {difference:.3g}"


def test_paper_mssa_matches_head_tokens_convention():
    """The closed form used above agrees with a per-head loop written from the column form."""
    generator = torch.Generator().manual_seed(0)
    Z, U = randn((1, 6, 4), generator), randn((2, 4, 2), generator)
    loop = sum(U[k] @ _column_ssa(U[k].T @ Z[0].T, axis=0) for k in range(2)).T
    gamma = U.shape[-1] / (Z.shape[-2] * 0.5**2)
    assert_close(paper_mssa(Z, U, 0.5)[0], gamma * loop, 1e-13, "paper MSSA vs per-head loop")
    assert head_tokens(Z, U).shape == (1, 2, 6, 2)
