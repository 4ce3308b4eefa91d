"""Bookkeeping of the objective functions: per-image values, the terms of the sparse rate reduction,
the LASSO indicator, and the steps' interfaces."""

import functools

import torch

import reference

generator = torch.Generator().manual_seed(0)
Z = torch.randn(3, 6, 4, dtype=torch.float64, generator=generator)
U = torch.randn(2, 4, 2, dtype=torch.float64, generator=generator)
D = torch.randn(4, 4, dtype=torch.float64, generator=generator)


def test_values_are_per_image():
    batched = reference.compression_rate(Z, U, 0.5)
    assert batched.shape == (3,)
    for image in range(3):
        assert torch.equal(reference.compression_rate(Z[image], U, 0.5), batched[image])
    assert reference.coding_rate(Z[0], 0.5).shape == ()


def test_sparse_rate_reduction_terms_add_up():
    X = torch.relu(Z)
    terms = reference.sparse_rate_reduction(X, U, 0.5, lam=0.2)
    assert torch.equal(terms.coding_rate, reference.coding_rate(X, 0.5))
    assert torch.equal(terms.compression_rate, reference.compression_rate(X, U, 0.5))
    assert torch.equal(terms.l1, X.sum((-2, -1)))
    assert torch.equal(terms.l0, (X > 0).sum((-2, -1)))
    assert torch.allclose(
        terms.objective, terms.coding_rate - terms.compression_rate - 0.2 * terms.l1, rtol=0, atol=1e-14
    )


def test_lasso_objective_is_infinite_exactly_for_negative_codes():
    A = torch.relu(Z)
    A[1, 2, 3] = -1e-300
    values = reference.lasso_objective(A, Z, D, 0.1)
    assert torch.isinf(values[1]) and values[1] > 0
    assert torch.isfinite(values[[0, 2]]).all()
    expected = 0.5 * ((Z[0].T - D @ A[0].T) ** 2).sum() + 0.1 * A[0].sum()
    assert torch.allclose(values[0], expected, rtol=1e-14, atol=0)


def test_ista_output_is_nonnegative_and_steps_keep_shape():
    assert (reference.ista_step(Z, D, 0.1, 0.1) >= 0).all()
    for mode in reference.COMPRESSION_MODES:
        assert reference.compression_step(Z, U, 0.5, 0.1, mode=mode).shape == Z.shape


def test_steps_are_differentiable_when_their_inputs_require_grad():
    """Second-order autograd through the steps matches finite differences (torch.autograd.gradcheck)."""
    X = Z[:1, :4].clone().requires_grad_(True)
    for mode in reference.COMPRESSION_MODES:
        step = functools.partial(reference.compression_step, U=U, eps=0.5, kappa=0.1, mode=mode)
        assert torch.autograd.gradcheck(step, (X,))
    dictionary = D.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, d: reference.ista_step(x, d, 0.1, 0.1), (X, dictionary))
    assert not reference.compression_step(Z, U, 0.5, 0.1).requires_grad
