"""The sparsification step (docs/math.md §4): rows 16, 17, 20 and 21 of the property table.

One ISTA block is one proximal-gradient step on the non-negative LASSO, warm-started at its input.
It decreases the objective from a feasible start when η <= 2/‖D‖₂² (row 20) and can increase it when
η is larger (row 21). Row 22 (the block decreases the LASSO objective of its own LayerNorm input) is
empirical and false in general: it is not asserted.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import reference
from verification.asserts import assert_close, assert_within, max_abs
from verification.closed_forms import ista_closed_form
from verification.strategies import log_uniform, randn, seeds, step_fractions


@st.composite
def lasso_problems(draw, *, nonnegative: bool = False):
    """Codes/data X (B, N, d), dictionary D (d, d), λ, drawn from a seed; X >= 0 when nonnegative."""
    batch, tokens, dim = draw(st.integers(1, 2)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    seed, scale = draw(seeds()), draw(log_uniform(1e-2, 1e2))
    dictionary_scale, lam = draw(log_uniform(1e-1, 3.0)), draw(st.floats(0.0, 1.0))
    generator = torch.Generator().manual_seed(seed)
    X = randn((batch, tokens, dim), generator, scale)
    X = X.abs() if nonnegative else X
    D = randn((dim, dim), generator, dictionary_scale * dim**-0.5)
    return X, D, lam


def _lipschitz(D: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(D, ord=2).item() ** 2


# Row 16 -----------------------------------------------------------------------------------------
@given(lasso_problems(), log_uniform(1e-3, 1.0))
def test_ista_block_is_autograd_proximal_gradient_step(problem, eta):
    """official ISTA block (D = weight) = paper ReLU(X + ηDᵀ(X − DX) − ηλ) = autograd prox step,
    within 1e-13(1 + ‖X‖_max)(1 + η‖D‖₂²)."""
    X, D, lam = problem
    block = reference.official.ISTA(D.shape[0], eta=eta, lam=lam)
    with torch.no_grad():
        block.weight.copy_(D)
        official = block(X)
    tolerance = 1e-13 * (1 + max_abs(X)) * (1 + eta * _lipschitz(D))
    paper = ista_closed_form(X, D, eta, lam)
    assert_close(official, paper, tolerance, "official ISTA vs paper closed form")
    assert_close(reference.ista_step(X, D, eta, lam), paper, tolerance, "autograd prox step vs paper")


@pytest.mark.parametrize("seed", range(3))
def test_ista_with_transposed_dictionary_is_detected(seed):
    """Negative control: using D = Wᵀ instead of D = W changes the output (docs/math.md: 0.54)."""
    generator = torch.Generator().manual_seed(seed)
    X, W = randn((1, 8, 6), generator), randn((6, 6), generator, 6**-0.5)
    difference = max_abs(reference.ista_step(X, W.T, 0.1, 0.1) - ista_closed_form(X, W, 0.1, 0.1))
    assert difference > 1e-3, f"D = Wᵀ within {difference:.3g} of D = W"


# Row 17 (numerical half; the symbolic half is in test_symbolic.py) -------------------------------
def test_prox_is_nonnegative_soft_threshold_on_a_grid():
    """max(v − t, 0) minimises ½(a − v)² + t·a over a >= 0: brute force over a grid of a with
    spacing h finds the same minimiser within h/2, for every v and t >= 0 on a grid."""
    h = 1e-3
    a = torch.arange(0, 6 + h, h, dtype=torch.float64)
    v = torch.linspace(-3, 3, 61, dtype=torch.float64)[:, None, None]
    t = torch.linspace(0, 2, 21, dtype=torch.float64)[None, :, None]
    brute_force = a[((a - v) ** 2 / 2 + t * a).argmin(-1)]
    prox = reference.nonnegative_soft_threshold(v[..., 0], t[..., 0])
    assert_within(max_abs(brute_force - prox), h / 2 + 1e-12, "grid minimiser vs max(v − t, 0)")


# Row 20 -----------------------------------------------------------------------------------------
@given(lasso_problems(nonnegative=True), step_fractions())
def test_ista_step_decreases_lasso_from_feasible_start(problem, fraction):
    """A₀ = X >= 0, η = fraction·2/‖D‖₂²: η(f(A₀) − f(A₁)) >= (1 − ηL/2)‖A₁ − A₀‖² (multiplied form:
    the 1/η form overflows for tiny η), allowance 1e-11·(η(1 + |f(A₀)|) + ‖A₁ − A₀‖²)."""
    X, D, lam = problem
    L = _lipschitz(D)
    eta = fraction * 2 / L
    A1 = reference.ista_step(X, D, eta, lam)
    before, after = reference.lasso_objective(X, X, D, lam), reference.lasso_objective(A1, X, D, lam)
    moved = ((A1 - X) ** 2).sum((-2, -1))
    shortfall = (1 - eta * L / 2) * moved - eta * (before - after)
    allowance = 1e-11 * (eta * (1 + before.abs()) + moved)
    assert_within((shortfall / allowance).max().item(), 1.0, "descent shortfall / allowance")


# Row 21 -----------------------------------------------------------------------------------------
def test_ista_step_beyond_two_over_lipschitz_increases_lasso():
    """Counterexample with the block's warm start A₀ = X: d = 1, D = 0.5 (L = 0.25), X = 2, λ = 0.
    f(A₀) = 0.5; at η = 2/L the step lands on f = 0.5 (the boundary), at η = 3/L on f = 2."""
    X, D = torch.full((1, 1, 1), 2.0, dtype=torch.float64), torch.full((1, 1), 0.5, dtype=torch.float64)
    f = lambda A: reference.lasso_objective(A, X, D, 0.0).item()  # noqa: E731
    L = _lipschitz(D)
    assert f(X) == 0.5
    assert f(reference.ista_step(X, D, 2 / L, 0.0)) == pytest.approx(0.5, abs=1e-15)
    assert f(reference.ista_step(X, D, 3 / L, 0.0)) == pytest.approx(2.0, abs=1e-15)


def test_ista_step_beyond_two_over_lipschitz_increases_lasso_for_random_problems():
    """At η = 2.5/L some random feasible problems see f rise (docs/math.md: 12/500), none at η = L⁻¹."""
    generator = torch.Generator().manual_seed(0)
    increases = {1.0: 0, 2.5: 0}
    for _ in range(200):
        X, D = randn((1, 3, 3), generator).abs(), randn((3, 3), generator)
        for multiple in increases:
            A1 = reference.ista_step(X, D, multiple / _lipschitz(D), 0.0)
            rises = reference.lasso_objective(A1, X, D, 0.0) > reference.lasso_objective(X, X, D, 0.0)
            increases[multiple] += int(rises.item())
    assert increases[2.5] > 0 and increases[1.0] == 0, increases
