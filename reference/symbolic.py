"""sympy derivations for tiny symbolic cases (docs/math.md §9 rows 2 and 17).

Each function derives its result with sympy (differentiation, equation solving) from the objective;
verification/ compares the results with the closed forms the layers use.
"""

import sympy as sp


def half_logdet_gradient(Y: sp.Matrix, a: sp.Expr) -> sp.Matrix:
    """∂/∂Y of ½·log det(I + a·YᵀY), entry by entry."""
    value = sp.log((sp.eye(Y.shape[1]) + a * Y.T * Y).det()) / 2
    return Y.applyfunc(lambda entry: sp.diff(value, entry))


def compression_rate_gradient(Z: sp.Matrix, U: sp.Matrix, gamma: sp.Expr) -> sp.Matrix:
    """∂/∂Z of one head's R_p(UᵀZ) = ½·log det(I_N + γ·ZᵀUUᵀZ), column form (Z is d×N, U is d×p)."""
    value = sp.log((sp.eye(Z.shape[1]) + gamma * (U.T * Z).T * (U.T * Z)).det()) / 2
    return Z.applyfunc(lambda entry: sp.diff(value, entry))


def nonnegative_l1_prox(v: sp.Symbol, t: sp.Symbol) -> sp.Expr:
    """argmin over a ≥ 0 of ½(a − v)² + t·a, for t ≥ 0.

    The objective is a convex parabola in a; its stationary point comes from sympy.solve, and the
    minimiser over [0, ∞) is that point when feasible, else the boundary a = 0.
    """
    a = sp.Symbol("a", real=True)
    (stationary,) = sp.solve(sp.diff((a - v) ** 2 / 2 + t * a, a), a)
    return sp.Piecewise((stationary, stationary >= 0), (0, True))
