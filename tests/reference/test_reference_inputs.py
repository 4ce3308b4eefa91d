"""The reference refuses bad input with an error that names what was wrong and what was expected."""

import pytest
import torch

import reference

Z = torch.randn(2, 5, 4, dtype=torch.float64)
U = torch.randn(2, 4, 2, dtype=torch.float64)
D = torch.randn(4, 4, dtype=torch.float64)

CALLS = {
    "coding_rate": lambda z: reference.coding_rate(z, 0.1),
    "compression_rate": lambda z: reference.compression_rate(z, U, 0.1),
    "compression_rate_taylor2": lambda z: reference.compression_rate_taylor2(z, U, 0.1),
    "sparse_rate_reduction": lambda z: reference.sparse_rate_reduction(z, U, 0.1, 0.1),
    "compression_step": lambda z: reference.compression_step(z, U, 0.1, 0.1),
    "expansion_step": lambda z: reference.expansion_step(z, U, 0.1, 0.1),
    "ista_step": lambda z: reference.ista_step(z, D, 0.1, 0.1),
    "lasso_objective": lambda z: reference.lasso_objective(z, z, D, 0.1),
    "attention_energy": lambda z: reference.attention_energy(z, z),
    "kernel_energy": lambda z: reference.kernel_energy(z),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
@pytest.mark.parametrize("name", CALLS)
def test_non_float64_tokens_are_refused(name, dtype):
    with pytest.raises(TypeError, match=rf"float64.*got {dtype}"):
        CALLS[name](Z.to(dtype))


@pytest.mark.parametrize("name", [n for n in CALLS if "energy" not in n])
@pytest.mark.parametrize("shape", [(4,), (1, 2, 5, 4), (2, 0, 4)])
def test_tokens_of_the_wrong_rank_are_refused(name, shape):
    with pytest.raises(ValueError, match=r"\(N, d\) or \(B, N, d\)"):
        CALLS[name](torch.zeros(shape, dtype=torch.float64))


def test_non_tensor_input_is_refused():
    with pytest.raises(TypeError, match=r"must be a torch\.Tensor, got list"):
        reference.coding_rate([[1.0, 2.0]], 0.1)


@pytest.mark.parametrize(
    "bad_U", [torch.randn(4, 2, dtype=torch.float64), torch.randn(2, 3, 2, dtype=torch.float64)]
)
def test_subspaces_of_the_wrong_shape_are_refused(bad_U):
    with pytest.raises(ValueError, match=r"U must have shape \(K, d, p\) = \(K, 4, p\)"):
        reference.compression_rate(Z, bad_U, 0.1)


def test_subspaces_must_be_float64():
    with pytest.raises(TypeError, match="U must be float64"):
        reference.compression_rate(Z, U.float(), 0.1)


def test_dictionary_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"D must have shape \(d, d\) = \(4, 4\), got \(3, 3\)"):
        reference.ista_step(Z, torch.eye(3, dtype=torch.float64), 0.1, 0.1)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: reference.coding_rate(Z, 0.0), "eps must be > 0"),
        (lambda: reference.compression_rate(Z, U, -1.0), "eps must be > 0"),
        (lambda: reference.compression_step(Z, U, 0.1, 0.0), "kappa must be > 0"),
        (lambda: reference.expansion_step(Z, U, 0.1, 0.0), "kappa must be > 0"),
        (lambda: reference.ista_step(Z, D, 0.0, 0.1), "eta must be > 0"),
        (lambda: reference.ista_step(Z, D, 0.1, -0.1), "lam must be >= 0"),
        (lambda: reference.attention_energy(Z, Z, temperature=0.0), "temperature must be > 0"),
        (lambda: reference.compression_step(Z, U, 0.1, 0.1, mode="neumann"), "mode must be one of"),
        (lambda: reference.lasso_objective(Z[:, :3], Z, D, 0.1), "same shape as X"),
    ],
)
def test_bad_constants_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()
