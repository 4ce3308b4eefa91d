"""sympy derivations for tiny symbolic cases: rows 2 and 17 of the property table."""

import sympy as sp

from reference import symbolic


def _matrix(name: str, rows: int, columns: int) -> sp.Matrix:
    return sp.Matrix(rows, columns, lambda i, j: sp.Symbol(f"{name}{i}{j}", real=True))


def _is_zero(matrix: sp.Matrix) -> bool:
    return all(sp.cancel(sp.together(entry)) == 0 for entry in matrix)


# Row 2 ------------------------------------------------------------------------------------------
def test_symbolic_half_logdet_gradient_equals_closed_form():
    """∂/∂Y ½logdet(I + aYᵀY) = aY(I + aYᵀY)⁻¹ exactly, Y symbolic 2×3 (the N side is 3×3)."""
    Y, a = _matrix("y", 2, 3), sp.Symbol("a", positive=True)
    closed = a * Y * (sp.eye(3) + a * Y.T * Y).inv()
    assert _is_zero(symbolic.half_logdet_gradient(Y, a) - closed)


def test_symbolic_compression_gradient_with_identity_basis():
    """(d, N) = (2, 3), U = I: ∇_Z R_p = γZ(I + γZᵀZ)⁻¹ exactly."""
    Z, gamma = _matrix("z", 2, 3), sp.Symbol("gamma", positive=True)
    closed = gamma * Z * (sp.eye(3) + gamma * Z.T * Z).inv()
    assert _is_zero(symbolic.compression_rate_gradient(Z, sp.eye(2), gamma) - closed)


def test_symbolic_compression_gradient_with_general_basis():
    """(d, N) = (2, 2), U a general 2×1 basis: ∇_Z R_p = γUUᵀZ(I + γZᵀUUᵀZ)⁻¹ exactly."""
    Z, U, gamma = _matrix("z", 2, 2), _matrix("u", 2, 1), sp.Symbol("gamma", positive=True)
    closed = gamma * U * U.T * Z * (sp.eye(2) + gamma * Z.T * U * U.T * Z).inv()
    assert _is_zero(symbolic.compression_rate_gradient(Z, U, gamma) - closed)


def test_symbolic_gradient_detects_a_wrong_closed_form():
    """Negative control: the check above rejects the closed form without the inverse."""
    Z, gamma = _matrix("z", 2, 2), sp.Symbol("gamma", positive=True)
    assert not _is_zero(symbolic.compression_rate_gradient(Z, sp.eye(2), gamma) - gamma * Z)


# Row 17 -----------------------------------------------------------------------------------------
def test_symbolic_prox_is_nonnegative_soft_threshold():
    """The derived argmin of ½(a − v)² + t·a over a >= 0 is max(v − t, 0), exactly, on a rational grid
    of v and t >= 0 covering both branches and the kink."""
    v, t = sp.Symbol("v", real=True), sp.Symbol("t", nonnegative=True)
    prox = symbolic.nonnegative_l1_prox(v, t)
    grid_v = [sp.Rational(k, 4) for k in range(-12, 13)]
    grid_t = [sp.Rational(k, 4) for k in range(0, 9)]
    for value in grid_v:
        for threshold in grid_t:
            assert prox.subs({v: value, t: threshold}) == sp.Max(value - threshold, 0), (value, threshold)
