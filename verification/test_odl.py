"""CRATE-α's sparse coding block (docs/crate-alpha.md §2): rows 29–33 of the property table.

The released ODL (over-complete dictionary learning) block is two proximal-gradient steps on the
non-negative LASSO f(a) = ½‖u − Da‖² + λ‖a‖₁ + 𝟙{a ≥ 0} with an over-complete D ∈ R^{d×m}, started at
a₀ = 0, then decoded by a second dictionary D₁ (row 29); its first step is the one-sided soft
threshold of ηDᵀu (row 30). From the zero start every step with η <= 2/‖D‖₂² decreases f (row 31),
a longer step can increase it (row 32), and tying D₁ = D or starting at a = u is detectably
different (row 33).
"""

from dataclasses import dataclass
from itertools import pairwise

import pytest
import torch
from hypothesis import example, given, note
from hypothesis import strategies as st

import reference
from reference.official_alpha import OvercompleteISTABlock
from verification.asserts import assert_close, assert_within, max_abs, relative_difference
from verification.closed_forms import overcomplete_first_step
from verification.strategies import DTYPE, log_uniform, randn, seeds, step_fractions


@dataclass(frozen=True)
class ODLProblem:
    """Tokens u (B, N, d), encoder D and decoder D₁ (d, m) with m >= d, and λ, drawn from a seed.
    Entries of u are N(0, scale²); of D and D₁, N(0, (dictionary_scale/√d)²), so ‖D‖₂ ≈
    dictionary_scale·(1 + √(m/d))."""

    batch: int
    tokens: int
    dim: int
    atoms: int
    seed: int
    scale: float
    dictionary_scale: float
    lam: float

    @property
    def u(self) -> torch.Tensor:
        return randn((self.batch, self.tokens, self.dim), self._generator(0), self.scale)

    @property
    def D(self) -> torch.Tensor:
        return randn((self.dim, self.atoms), self._generator(1), self.dictionary_scale * self.dim**-0.5)

    @property
    def D1(self) -> torch.Tensor:
        return randn((self.dim, self.atoms), self._generator(2), self.dictionary_scale * self.dim**-0.5)

    @property
    def lipschitz(self) -> float:
        return _lipschitz(self.D)

    def _generator(self, stream: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 3 + stream)


@st.composite
def odl_problems(draw, *, whole_ratio: bool = False, max_dim: int = 8) -> ODLProblem:
    """whole_ratio: m = ratio·d with ratio in 1..4 (the released block's shape); else any m in d..4d."""
    dim = draw(st.integers(1, max_dim))
    atoms = dim * draw(st.integers(1, 4)) if whole_ratio else draw(st.integers(dim, 4 * dim))
    problem = ODLProblem(
        batch=draw(st.integers(1, 2)),
        tokens=draw(st.integers(1, 9)),
        dim=dim,
        atoms=atoms,
        seed=draw(seeds()),
        scale=draw(log_uniform(1e-2, 1e2)),
        dictionary_scale=draw(log_uniform(1e-1, 3.0)),
        lam=draw(st.one_of(st.just(0.0), st.floats(0.0, 1.0))),
    )
    note(f"{problem}, L={problem.lipschitz:.4g}")
    return problem


def _lipschitz(D: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(D, ord=2).item() ** 2


def _released_block(D: torch.Tensor, D1: torch.Tensor, eta: float, lam: float) -> OvercompleteISTABlock:
    dim, atoms = D.shape
    block = OvercompleteISTABlock(dim, atoms // dim, eta=eta, lam=lam)
    with torch.no_grad():
        block.D.copy_(D)
        block.D1.copy_(D1)
    return block


def _absolute_sizes(u, D, D1, eta, lam) -> tuple[float, float, float]:
    """The block's formula evaluated on |u|, |D|, |D₁| with every sign made positive and no ReLU:
    entry-wise bounds on the terms of each sum, so u_mach·(sum length)·size bounds the rounding of
    a₁, a₂ and D₁a₂ (and the propagation of a₁'s error through a₂), whatever the order of summation."""
    u, D, D1 = u.abs(), D.abs(), D1.abs()
    size_a1 = eta * u @ D + eta * lam
    size_a2 = size_a1 + eta * (size_a1 @ D.T + u) @ D + eta * lam
    return max_abs(size_a1), max_abs(size_a2), max_abs(size_a2 @ D1.T)


# Row 29 -----------------------------------------------------------------------------------------
@given(odl_problems(whole_ratio=True), log_uniform(1e-3, 1.0))
@example(ODLProblem(1, 1, 1, 4, seed=0, scale=1.0, dictionary_scale=1.0, lam=0.0), 0.1)  # one token, m = 4d
@example(ODLProblem(2, 3, 5, 5, seed=1, scale=1.0, dictionary_scale=1.0, lam=0.1), 1e-3)  # m = d
@example(ODLProblem(2, 9, 8, 32, seed=2, scale=1e2, dictionary_scale=3.0, lam=1.0), 1.0)  # m = 4d, ηL ≈ 76
@example(ODLProblem(1, 5, 8, 32, seed=3, scale=1e-2, dictionary_scale=0.1, lam=0.0), 0.1)  # tiny scales
def test_released_odl_block_is_two_autograd_proximal_gradient_steps_then_decoder(problem, eta):
    """The released block (literal einsum code, D and D₁ copied in) = reference.proximal_gradient_steps
    from zero, two steps, then D₁: a₁, a₂ and the output each within 1e-13·(1 + the size of that tensor
    computed on absolute values, see _absolute_sizes)."""
    u, D, D1, lam = problem.u, problem.D, problem.D1, problem.lam
    note(f"eta={eta:.4g}, eta*L={eta * problem.lipschitz:.4g}")
    block = _released_block(D, D1, eta, lam)
    with torch.no_grad():
        released_codes, released_output = block.codes(u), block(u)
    steps = reference.proximal_gradient_steps(u, D, eta, lam, steps=2)
    size_a1, size_a2, size_output = _absolute_sizes(u, D, D1, eta, lam)
    assert_close(released_codes[0], steps[0], 1e-13 * (1 + size_a1), "released a₁ vs autograd step 1")
    assert_close(released_codes[1], steps[1], 1e-13 * (1 + size_a2), "released a₂ vs autograd step 2")
    decoded = torch.einsum("bnm,dm->bnd", steps[1], D1)  # D₁a₂ per token, token-major
    assert_close(released_output, decoded, 1e-13 * (1 + size_output), "released output vs D₁·(step 2)")


# Row 30 -----------------------------------------------------------------------------------------
@given(odl_problems(), log_uniform(1e-3, 1.0))
@example(ODLProblem(1, 1, 1, 1, seed=0, scale=1.0, dictionary_scale=1.0, lam=0.0), 1.0)  # m = d = 1
@example(ODLProblem(1, 1, 3, 12, seed=4, scale=1.0, dictionary_scale=1.0, lam=0.0), 0.1)  # m = 4d, λ = 0
def test_first_step_from_zero_is_one_sided_soft_threshold(problem, eta):
    """proximal_gradient_steps(u, D, η, λ, 1) from zero = ReLU(ηDᵀu − ηλ), within
    1e-13·(1 + max(η|u|·|D|) + ηλ), the size of the terms of the one sum of length d."""
    u, D, lam = problem.u, problem.D, problem.lam
    (first,) = reference.proximal_gradient_steps(u, D, eta, lam, steps=1)
    size, _, _ = _absolute_sizes(u, D, D, eta, lam)
    assert_close(
        first, overcomplete_first_step(u, D, eta, lam), 1e-13 * (1 + size), "step 1 vs ReLU(ηDᵀu − ηλ)"
    )


# Row 31 -----------------------------------------------------------------------------------------
@given(odl_problems(), step_fractions(), st.integers(1, 5))
@example(ODLProblem(1, 1, 1, 1, seed=0, scale=1.0, dictionary_scale=1.0, lam=0.0), 1.0, 5)  # η = 2/L, m = d
@example(ODLProblem(2, 4, 3, 12, seed=5, scale=1e2, dictionary_scale=3.0, lam=0.0), 1.0, 5)  # m = 4d, λ = 0
@example(ODLProblem(1, 3, 4, 16, seed=6, scale=1.0, dictionary_scale=1.0, lam=1.0), 1e-3, 3)  # tiny η
def test_proximal_gradient_steps_from_zero_decrease_overcomplete_lasso(problem, fraction, steps):
    """a₀ = 0, η = fraction·2/‖D‖₂²: every iterate is >= 0 and every step satisfies
    η(f(a_k) − f(a_{k+1})) >= (1 − ηL/2)‖a_{k+1} − a_k‖² (multiplied form, as row 20), allowance
    1e-11·(η(1 + |f(a_k)|) + ‖a_{k+1} − a_k‖²)."""
    u, D, lam = problem.u, problem.D, problem.lam
    L = problem.lipschitz
    eta = fraction * 2 / L
    note(f"eta={eta:.4g}")
    iterates = [u.new_zeros((*u.shape[:-1], D.shape[1]))]
    iterates += reference.proximal_gradient_steps(u, D, eta, lam, steps=steps)
    values = [reference.lasso_objective(A, u, D, lam) for A in iterates]
    for k in range(steps):
        assert (iterates[k + 1] >= 0).all(), f"iterate {k + 1} has a negative code"
        before, after = values[k], values[k + 1]
        moved = ((iterates[k + 1] - iterates[k]) ** 2).sum((-2, -1))
        shortfall = (1 - eta * L / 2) * moved - eta * (before - after)
        allowance = 1e-11 * (eta * (1 + before.abs()) + moved)
        assert_within(
            (shortfall / allowance).max().item(), 1.0, f"step {k + 1}: descent shortfall / allowance"
        )


# Row 32 -----------------------------------------------------------------------------------------
def test_step_beyond_two_over_lipschitz_increases_overcomplete_lasso():
    """docs/crate-alpha.md §2: d = 1, D = [1 1] (L = 2), u = 2, λ = 0, a₀ = 0: f(a₀) = 2; at η = 2/L the
    step lands on a₁ = [2 2], f = 2 (the boundary); at η = 3/L on a₁ = [3 3], f = 8. Exact in floats."""
    u = torch.full((1, 1, 1), 2.0, dtype=DTYPE)
    D = torch.ones((1, 2), dtype=DTYPE)
    f = lambda A: reference.lasso_objective(A, u, D, 0.0).item()  # noqa: E731
    assert _lipschitz(D) == pytest.approx(2.0, abs=1e-15)
    assert f(u.new_zeros((1, 1, 2))) == 2.0
    for eta, code, value in ((1.0, 2.0, 2.0), (1.5, 3.0, 8.0)):  # η = 2/L, 3/L
        (a1,) = reference.proximal_gradient_steps(u, D, eta, 0.0, steps=1)
        assert torch.equal(a1, torch.full((1, 1, 2), code, dtype=DTYPE)), (eta, a1)
        assert f(a1) == value, (eta, f(a1))


def test_step_beyond_two_over_lipschitz_increases_overcomplete_lasso_for_random_problems():
    """Two steps from zero (the block's count), d = 3, m = 4d, 200 fixed-seed problems: at η = 2.5/L
    some step raises f (measured 36/200), at η = 1/L none does."""
    generator = torch.Generator().manual_seed(0)
    increases = {1.0: 0, 2.5: 0}
    for _ in range(200):
        u, D = randn((1, 3, 3), generator), randn((3, 12), generator)
        for multiple in increases:
            iterates = [u.new_zeros((1, 3, 12))]
            iterates += reference.proximal_gradient_steps(u, D, multiple / _lipschitz(D), 0.0, steps=2)
            values = [reference.lasso_objective(A, u, D, 0.0).item() for A in iterates]
            increases[multiple] += int(any(after > before for before, after in pairwise(values)))
    assert increases[2.5] > 0 and increases[1.0] == 0, increases


# Row 33 -----------------------------------------------------------------------------------------
def _released_init(seed: int, dim: int = 8, ratio: int = 4):
    """u like a LayerNorm output (N(0, 1) entries), D and D₁ as the release initialises them
    (kaiming-uniform U(±√(6/m)), m = ratio·d), η = λ = 0.1."""
    generator = torch.Generator().manual_seed(seed)
    bound = (6 / (ratio * dim)) ** 0.5
    D = (torch.rand((dim, ratio * dim), generator=generator, dtype=DTYPE) * 2 - 1) * bound
    D1 = (torch.rand((dim, ratio * dim), generator=generator, dtype=DTYPE) * 2 - 1) * bound
    return randn((2, 5, dim), generator), D, D1


@pytest.mark.parametrize("seed", range(3))
def test_tied_decoder_is_detected(seed):
    """Negative control: the block with D₁ = D differs from two steps then the learned D₁ by more
    than 10% (relative, Frobenius; measured 1.87–2.05 at the released initialisation, d = 8, m = 4d)."""
    u, D, D1 = _released_init(seed)
    steps = reference.proximal_gradient_steps(u, D, 0.1, 0.1, steps=2)
    untied = torch.einsum("bnm,dm->bnd", steps[1], D1)
    with torch.no_grad():
        tied = _released_block(D, D, 0.1, 0.1)(u)
    difference = relative_difference(tied, untied)
    assert difference > 0.1, f"D₁ = D within {difference:.3g} of the untied block"


@pytest.mark.parametrize("seed", range(3))
def test_warm_start_at_the_input_is_detected(seed):
    """Negative control: starting at a₀ = [u, 0] (CRATE's warm start, padded with zeros to m atoms)
    instead of a₀ = 0 changes the released block's codes a₂ and its output by more than 10%
    (relative, Frobenius; measured 3.90–4.40 and 3.99–4.86 at the released initialisation, d = 8, m = 4d)."""
    u, D, D1 = _released_init(seed)
    start = torch.cat([u, u.new_zeros((*u.shape[:-1], D.shape[1] - u.shape[-1]))], dim=-1)
    warm = reference.proximal_gradient_steps(u, D, 0.1, 0.1, steps=2, start=start)[1]
    block = _released_block(D, D1, 0.1, 0.1)
    with torch.no_grad():
        codes, output = block.codes(u)[1], block(u)
    code_difference = relative_difference(warm, codes)
    output_difference = relative_difference(torch.einsum("bnm,dm->bnd", warm, D1), output)
    assert code_difference > 0.1, f"warm-start codes within {code_difference:.3g} of the released block's"
    assert output_difference > 0.1, (
        f"warm-start output within {output_difference:.3g} of the released block's"
    )
