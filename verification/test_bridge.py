"""Bridge identities between the paper operator and the official architecture (docs/math.md §6):
rows 13, 14 and 15 of the property table (row 16, the ISTA bridge, is in test_ista.py)."""

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import reference
from verification.asserts import assert_close, max_abs
from verification.closed_forms import subspace_stack
from verification.strategies import head_problems, log_uniform, official_problems, step_fractions


def _tied_official_layer(
    U: torch.Tensor, kappa: float, gamma: float, rho: float
) -> reference.official.Transformer:
    """One official layer with LN₁ removed, s = 1, W_qkv = U_[K]ᵀ, W_out = κγ²U_[K], b_out = 0."""
    heads, dim, head_dim = U.shape
    layer = reference.official.Transformer(dim, 1, heads, head_dim, eta=0.1, lam=0.1, rho=rho)
    mssa = layer.layers[0][0]
    mssa.norm = nn.Identity()
    mssa.fn.scale = 1.0
    with torch.no_grad():
        mssa.fn.qkv.weight.copy_(subspace_stack(U).T)
        mssa.fn.to_out[0].weight.copy_(kappa * gamma**2 * subspace_stack(U))
        mssa.fn.to_out[0].bias.zero_()
    return layer


# Row 13 -----------------------------------------------------------------------------------------
@given(head_problems(complete=True, min_heads=2, scales=(1e-2, 3.0), eps=(0.3, 3.0)), step_fractions())
def test_tied_official_block_is_paper_softmax_step(problem, fraction):
    """With ρ = 1 − κγ the tied official block equals the reference's softmax step (autograd of the
    surrogate); with the official ρ = 1 it differs by exactly κγZ. 1e-12 × the size of the terms.
    K >= 2: with one head and p = d the official block has no output projection to tie."""
    Z, U, eps, gamma = problem.Z, problem.U, problem.eps, problem.gamma
    kappa = fraction / gamma
    paper = reference.compression_step(Z, U, eps, kappa, mode="softmax")
    with torch.no_grad():
        tied = _tied_official_layer(U, kappa, gamma, rho=1 - kappa * gamma).forward_intermediates(Z)[0].mssa
        official = _tied_official_layer(U, kappa, gamma, rho=1.0).forward_intermediates(Z)[0].mssa
    size = max_abs(Z) + max_abs(paper)
    assert_close(tied, paper, 1e-12 * size, "tied official block (ρ = 1 − κγ) vs paper step")
    assert_close(official - paper, kappa * gamma * Z, 1e-12 * size, "official ρ = 1 minus paper step vs κγZ")


# Row 14 -----------------------------------------------------------------------------------------
def _transformer_output(model: reference.OfficialCRATE, X: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.transformer(X)


@given(official_problems(), log_uniform(1e-2, 1e2))
def test_temperature_is_absorbed_into_the_projections(problem, temperature):
    """W_qkv → s^{½}W_qkv, W_out → s^{-½}W_out, s → 1 leaves every layer unchanged (1e-12 × scale)."""
    model, X = problem.model(), problem.X
    for mssa, _ in model.transformer.layers:
        mssa.fn.scale = temperature
    expected = _transformer_output(model, X)
    with torch.no_grad():
        for mssa, _ in model.transformer.layers:
            mssa.fn.scale = 1.0
            mssa.fn.qkv.weight.mul_(temperature**0.5)
            if isinstance(mssa.fn.to_out, nn.Sequential):
                mssa.fn.to_out[0].weight.mul_(temperature**-0.5)
            else:  # one head with p = d: no projection to absorb s^{-½}, so it stays on the stream
                mssa.fn.to_out = _Scale(temperature**-0.5)
    actual = _transformer_output(model, X)
    assert_close(actual, expected, 1e-12 * (1 + max_abs(expected)), "absorbed temperature")


class _Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.factor * x


@given(official_problems(), st.integers(0, 2**31 - 1))
def test_per_head_rotation_leaves_layers_unchanged(problem, rotation_seed):
    """U_k → U_kQ_k and W_out,k → W_out,kQ_k with Q_k ∈ O(p) leave every layer unchanged."""
    model, X = problem.model(), problem.X
    expected = _transformer_output(model, X)
    generator = torch.Generator().manual_seed(rotation_seed)
    p = problem.head_dim
    with torch.no_grad():
        for mssa, _ in model.transformer.layers:
            rotations = torch.linalg.qr(
                torch.randn(problem.heads, p, p, generator=generator, dtype=X.dtype)
            ).Q
            qkv = mssa.fn.qkv.weight.unflatten(0, (problem.heads, p))  # (K, p, d): U_kᵀ
            mssa.fn.qkv.weight.copy_((rotations.transpose(-1, -2) @ qkv).flatten(0, 1))
            if isinstance(mssa.fn.to_out, nn.Sequential):
                out = mssa.fn.to_out[0].weight.unflatten(1, (problem.heads, p)).transpose(0, 1)  # (K, d, p)
                mssa.fn.to_out[0].weight.copy_((out @ rotations).transpose(0, 1).flatten(1))
            else:  # identity output: U → UQ alone changes the stream, so rotate back explicitly
                mssa.fn.to_out = _RightMultiply(rotations[0].T)
    actual = _transformer_output(model, X)
    assert_close(actual, expected, 1e-12 * (1 + max_abs(expected)), "rotated heads")


class _RightMultiply(nn.Module):
    def __init__(self, matrix: torch.Tensor):
        super().__init__()
        self.matrix = matrix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix


# Row 15 -----------------------------------------------------------------------------------------
@given(official_problems(), st.randoms(use_true_random=False))
def test_transformer_is_token_permutation_equivariant(problem, random):
    """Permuting the tokens of the stream permutes every layer's output the same way (1e-12 × scale)."""
    model, X = problem.model(), problem.X
    permutation = list(range(problem.tokens))
    random.shuffle(permutation)
    expected = _transformer_output(model, X)[:, permutation]
    actual = _transformer_output(model, X[:, permutation])
    assert_close(actual, expected, 1e-12 * (1 + max_abs(expected)), "permuted tokens")
