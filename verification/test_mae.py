"""CRATE-MAE (docs/crate-mae.md): the decoder's step is the compression step reversed, its linear step
undoes ISTA in a special case, masking and the loss are what they say, and the fast model equals the
released one in float64.

Exact identities (rounding tolerances): the tied decoder block is the paper's expansion step (ρ = 1 + κγ;
the official ρ = 1 differs by exactly −κγu); D·ISTA(X) = X for orthogonal D, η = 1, λ = 0, DᵀX >= 0;
the masking's permutation and counts; the loss ignores kept patches; fast = reference (embedding bit for
bit, the model to 1e-10·(1 + max|ref|)). Bounds (asserted with a rounding allowance): the exact
expansion step raises R^c by at least κ(1 − Lκ/2)‖∇R^c‖² for κ <= 2/L, since −L ⪯ ∇²R^c ⪯ L; and
‖D·ISTA(X) − X‖ <= ‖(1 − η)(X − Y) − ηλ‖ per token for orthogonal D and Y = DᵀX >= 0. Empirical (not
asserted): how far a released decoder layer is from inverting its encoder layer
(verification/mae_roundtrip.py); only its bookkeeping is tested here.
"""

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import assume, example, given, note
from hypothesis import strategies as st
from torch import nn

import reference
from crate.models import mae
from reference import official_mae
from verification.asserts import assert_close, assert_within, max_abs
from verification.closed_forms import subspace_stack
from verification.mae_roundtrip import fast_round_trip_errors, reference_round_trip_errors, round_trip_errors
from verification.strategies import (
    HeadProblem,
    head_problems,
    log_uniform,
    orthonormal_columns,
    randn,
    randomise_affine,
    scaled_settings,
    seeds,
    step_fractions,
)

U_ROUNDING = 2.0**-53


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: the shapes are tiny, and two OpenMP threads on a loaded 2-core machine
    spin-wait on each other (verification/test_fast_model.py measured 10× slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The expansion step ------------------------------------------------------------------------------
def _tied_decoder_block(U: torch.Tensor, kappa: float, gamma: float, rho: float) -> official_mae.DecoderBlock:
    """A released decoder block whose linear step is the identity (LN₁ removed, W = I), with LN₂
    removed, s = 1, W_qkv = U_[K]ᵀ, W_out = κγ²U_[K], b_out = 0: it computes ρ·u − MSSA(u)."""
    heads, dim, head_dim = U.shape
    block = official_mae.DecoderBlock(dim, heads, head_dim, rho=rho)
    linear, mssa = block.layers[0]
    linear.norm = mssa.norm = nn.Identity()
    mssa.fn.scale = 1.0
    with torch.no_grad():
        linear.fn.weight.copy_(torch.eye(dim, dtype=U.dtype))
        mssa.fn.qkv.weight.copy_(subspace_stack(U).T)
        mssa.fn.to_out[0].weight.copy_(kappa * gamma**2 * subspace_stack(U))
        mssa.fn.to_out[0].bias.zero_()
    return block


@given(head_problems(complete=True, min_heads=2, scales=(1e-2, 3.0), eps=(0.3, 3.0)), step_fractions())
def test_tied_decoder_block_is_paper_expansion_step(problem, fraction):
    """For complete orthonormal U_[K] the surrogate's gradient is γu − γ²Σ_k SSA(uU_k)U_kᵀ, so
    u + κ∇ = (1 + κγ)u − MSSA_tied(u): the tied block with ρ = 1 + κγ equals the reference's softmax
    expansion step (autograd), and the official ρ = 1 differs from it by exactly −κγu (the mirror of
    the encoder's +κγu, test_bridge.py). 1e-12 × the size of the terms. K >= 2: one head with p = d
    has no output projection to tie."""
    Z, U, eps, gamma = problem.Z, problem.U, problem.eps, problem.gamma
    kappa = fraction / gamma
    paper = reference.expansion_step(Z, U, eps, kappa, mode="softmax")
    with torch.no_grad():
        tied = _tied_decoder_block(U, kappa, gamma, rho=1 + kappa * gamma).states(Z).output
        official = _tied_decoder_block(U, kappa, gamma, rho=1.0).states(Z).output
    size = max_abs(Z) + max_abs(paper)
    assert_close(tied, paper, 1e-12 * size, "tied decoder block (ρ = 1 + κγ) vs paper expansion step")
    assert_close(official - paper, -kappa * gamma * Z, 1e-12 * size, "official ρ = 1 minus paper vs −κγu")


def _lipschitz(problem: HeadProblem) -> float:
    return problem.gamma * torch.linalg.matrix_norm(subspace_stack(problem.U), ord=2).item() ** 2


def _per_image_norm(tensor: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(tensor.flatten(1), dim=-1)


@given(head_problems(max_dim=5, max_tokens=6, max_batch=1, scales=(1e-2, 10.0)))
def test_compression_rate_hessian_is_bounded_below_by_minus_lipschitz_constant(problem):
    """λ_min(∇²R^c) >= −L(1 + 1e-9), L = γ‖U_[K]‖₂². Per head, with Y = U_kᵀZ, Δ = U_kᵀH (columns) and
    M = I + γYYᵀ, the second derivative of ½logdet M along H is γ‖M^{-½}Δ‖² − ½γ²‖A + Aᵀ‖²_F with
    A = M^{-½}ΔYᵀM^{-½}; ‖A‖_F <= ‖M^{-½}Δ‖_F·‖YᵀM^{-½}‖₂ and ‖YᵀM^{-½}‖₂² = max σ²/(1 + γσ²) <= 1/γ,
    so it is >= −γ‖M^{-½}Δ‖² >= −γ‖Δ‖²; summed over heads, >= −γ‖U_[K]ᵀH‖² >= −L‖H‖². (Measured:
    −λ_min/L <= 0.125, the scalar case's 1/8; row 19 is the upper bound.)"""
    Z, U, eps = problem.Z[0], problem.U, problem.eps
    hessian = torch.autograd.functional.hessian(
        lambda flat: reference.compression_rate(flat.reshape(Z.shape), U, eps), Z.flatten()
    )
    smallest = torch.linalg.eigvalsh((hessian + hessian.T) / 2).min().item()
    assert_within(-smallest / _lipschitz(problem), 1 + 1e-9, "−min Hessian eigenvalue / L")


@given(head_problems(scales=(1e-2, 30.0)), step_fractions())
def test_exact_expansion_step_raises_rate_sufficiently(problem, fraction):
    """For κ = fraction·2/L: R^c(Z + κ∇) >= R^c(Z) + κ(1 − Lκ/2)‖∇‖² (Taylor with the remainder
    ½κ²∇ᵀ∇²R^c(ξ)∇ >= −½Lκ²‖∇‖², by the Hessian's lower bound above); for κ <= 1/L the gain is at
    least κ‖∇‖²/2. Allowance 1e-11(1 + |R^c|), as row 18 (the descent half)."""
    L = _lipschitz(problem)
    kappa = fraction * 2 / L
    Z, U, eps = problem.Z, problem.U, problem.eps
    before = reference.compression_rate(Z, U, eps)
    after = reference.compression_rate(reference.expansion_step(Z, U, eps, kappa, mode="exact"), U, eps)
    gradient = reference.compression_gradient(Z, U, eps, mode="exact")
    guaranteed = kappa * (1 - L * kappa / 2) * _per_image_norm(gradient) ** 2
    deficit = before + guaranteed - after
    assert_within((deficit / (1e-11 * (1 + before.abs()))).max().item(), 1.0, "deficit / allowance")


# ISTA and the decoder's linear step ---------------------------------------------------------------
@dataclass(frozen=True)
class OrthogonalCodes:
    """An orthogonal dictionary D (d, d) and tokens X = YDᵀ (B, N, d) (column form x = Dy), so that
    their codes Y = XD = DᵀX (column form) are the drawn non-negative Y."""

    D: torch.Tensor
    X: torch.Tensor
    Y: torch.Tensor


@st.composite
def orthogonal_codes(draw) -> OrthogonalCodes:
    batch, tokens, dim = draw(st.integers(1, 2)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    seed, scale = draw(seeds()), draw(log_uniform(1e-2, 1e2))
    note(f"codes batch={batch}, tokens={tokens}, dim={dim}, seed={seed}, scale={scale:.4g}")
    generator = torch.Generator().manual_seed(seed)
    D = orthonormal_columns(dim, dim, generator)
    Y = randn((batch, tokens, dim), generator, scale).abs()
    return OrthogonalCodes(D, Y @ D.T, Y)


def _released_ista(D: torch.Tensor, eta: float, lam: float) -> reference.official.ISTA:
    block = reference.official.ISTA(D.shape[0], eta=eta, lam=lam)
    with torch.no_grad():
        block.weight.copy_(D)
    return block


def _decoder_linear_step(D: torch.Tensor) -> official_mae.LinearStep:
    """The released decoder's linear step u = a·Wᵀ with W = D: column form u = Da."""
    step = official_mae.LinearStep(D.shape[0])
    with torch.no_grad():
        step.weight.copy_(D)
    return step


def _round_trip(D: torch.Tensor, X: torch.Tensor, eta: float, lam: float) -> torch.Tensor:
    with torch.no_grad():
        return _decoder_linear_step(D)(_released_ista(D, eta, lam)(X))


def _token_norm(tensor: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(tensor, dim=-1)


@given(orthogonal_codes())
def test_linear_step_inverts_ista_for_orthogonal_dictionary_unit_step_no_threshold(codes):
    """Exact: DᵀD = I, η = 1, λ = 0 give ISTA(x) = ReLU(x + Dᵀx − DᵀDx) = ReLU(Dᵀx) = Dᵀx (DᵀX >= 0),
    so the decoder's linear step with W = D returns D·Dᵀx = x. Tolerance 16·d^{3/2}·u·max|X|: four
    d-term products of unit-norm rows with tokens of ℓ2 norm <= √d·max|X| (and D orthogonal to ~d·u)."""
    D, X = codes.D, codes.X
    dim = D.shape[0]
    assert_close(_round_trip(D, X, 1.0, 0.0), X, 16 * dim**1.5 * U_ROUNDING * max_abs(X), "D·ISTA(X) vs X")


@given(orthogonal_codes(), log_uniform(1e-3, 3.0), st.floats(0.0, 1.0))
@example(
    OrthogonalCodes(*(torch.tensor(v, dtype=torch.float64) for v in ([[1.0]], [[[0.5]]], [[[0.5]]]))),
    1.0,
    0.3,
)  # the bound holds with equality while the threshold does not clip: |0.5 − 0.3 − 0.5| = 0.3
def test_linear_step_after_ista_error_is_bounded(codes, eta, lam):
    """Bound: for DᵀD = I, ISTA(x) = ReLU(x + ηDᵀx − ηx − ηλ) = ReLU(v), v = (1 − η)x + ηy − ηλ with
    y = Dᵀx >= 0. ReLU is 1-Lipschitz entry-wise and fixes y, so |ReLU(v) − y| <= |v − y| entry-wise,
    and D·ISTA(x) − x = D(ReLU(v) − y) has the ℓ2 norm of ReLU(v) − y (D orthogonal, Dy = x):
    ‖D·ISTA(x) − x‖ <= ‖(1 − η)(x − y) − ηλ𝟙‖ per token, with equality where v >= 0. Any η > 0, λ >= 0.
    Allowance 1e-13·((1 + 2η)‖x‖ + ηλ√d) per token, the size of ISTA's terms (>= 50·d·u of it, d <= 9)."""
    D, X, Y = codes.D, codes.X, codes.Y
    error = _token_norm(_round_trip(D, X, eta, lam) - X)
    bound = _token_norm((1 - eta) * (X - Y) - eta * lam)
    allowance = 1e-13 * ((1 + 2 * eta) * _token_norm(X) + eta * lam * math.sqrt(D.shape[0]))
    assert_within(((error - bound) / allowance).max().item(), 1.0, "(error − bound) / allowance")


@pytest.mark.parametrize(
    ("dictionary", "token", "why"),
    [
        (2.0, 2.0, "D = 2 is not orthogonal (y = Dᵀx = 4 >= 0): ISTA(2) = ReLU(2 + 2(2 − 4)) = 0"),
        (1.0, -1.0, "D = 1 is orthogonal but y = Dᵀx = −1 < 0: ISTA(−1) = ReLU(−1) = 0"),
    ],
)
def test_linear_step_after_ista_bound_needs_its_hypotheses(dictionary, token, why):
    """Negative control: with η = 1, λ = 0 the bound claims an exact round trip; drop either
    hypothesis and the round trip misses x by |x| (D·0 − x), the bound staying 0."""
    D, X = torch.tensor([[dictionary]], dtype=torch.float64), torch.tensor([[[token]]], dtype=torch.float64)
    Y = X @ D
    error = _token_norm(_round_trip(D, X, 1.0, 0.0) - X).item()
    bound = _token_norm((1 - 1.0) * (X - Y) - 0.0).item()
    assert (error, bound) == (abs(token), 0.0), why


def test_linear_step_after_ista_misses_negative_codes_of_random_orthogonal_dictionary():
    """Negative control in d = 6: orthogonal D, codes of both signs, η = 1, λ = 0: the round trip is
    D·ReLU(Y), which misses x by ‖min(Y, 0)‖ > 0 where the bound (0) would claim exactness."""
    generator = torch.Generator().manual_seed(0)
    D = orthonormal_columns(6, 6, generator)
    Y = randn((1, 4, 6), generator)
    X = Y @ D.T
    error = _token_norm(_round_trip(D, X, 1.0, 0.0) - X)
    expected = _token_norm(Y.clamp_max(0))
    assert (expected > 0.1).all()
    assert_close(error, expected, 1e-13 * max_abs(X), "round-trip miss vs ‖min(Y, 0)‖")


# The models under test ------------------------------------------------------------------------------
@dataclass(frozen=True)
class MAEProblem:
    """A random released CRATE-MAE (LayerNorm affine and every bias randomised too), images and a
    masking noise with distinct values (a permutation of 0..L−1 per image, so no argsort tie)."""

    batch: int
    channels: int
    patch_size: int
    grid: int
    heads: int
    head_dim: int
    depth: int
    seed: int
    mask_ratio: float
    norm_pix_loss: bool = False

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def num_patches(self) -> int:
        return self.grid**2

    def state_dict(self) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        state = official_mae.random_official_mae_state_dict(
            dim=self.dim,
            depth=self.depth,
            heads=self.heads,
            head_dim=self.head_dim,
            patch_size=self.patch_size,
            channels=self.channels,
            num_patches=self.num_patches,
            generator=generator,
        )
        return randomise_affine(state, generator)

    def reference(self) -> official_mae.OfficialCRATEMAE:
        return official_mae.OfficialCRATEMAE.from_state_dict(
            self.state_dict(), heads=self.heads, norm_pix_loss=self.norm_pix_loss
        )

    def config(self) -> mae.CRATEMAEConfig:
        side = self.grid * self.patch_size
        return mae.CRATEMAEConfig(
            img_size=(side, side),
            patch_size=self.patch_size,
            in_chans=self.channels,
            dim=self.dim,
            depth=self.depth,
            heads=self.heads,
            mask_ratio=self.mask_ratio,
            norm_pix_loss=self.norm_pix_loss,
            fused_attn=False,
        )

    def fast(self) -> mae.CRATEMAE:
        model = mae.CRATEMAE(self.config()).double().eval()
        mae.load_released_mae_state_dict(model, self.state_dict())
        return model

    def _generator(self, stream: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 3 + stream)

    @property
    def images(self) -> torch.Tensor:
        side = self.grid * self.patch_size
        return randn((self.batch, self.channels, side, side), self._generator(1))

    @property
    def noise(self) -> torch.Tensor:
        generator = self._generator(2)
        rows = [torch.randperm(self.num_patches, generator=generator) for _ in range(self.batch)]
        return torch.stack(rows).double()


# (heads, p) with d = K·p divisible by 4 (the sin-cos table); (1, 4) and (1, 8): one head spanning d
HEAD_SHAPES = [(1, 4), (1, 8), (2, 2), (2, 4), (3, 4), (4, 1), (4, 2)]


@st.composite
def mae_problems(draw, *, max_depth: int = 2, norm_pix_loss: bool | None = False) -> MAEProblem:
    heads, head_dim = draw(st.sampled_from(HEAD_SHAPES))
    channels, patch_size = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    if channels * patch_size**2 == 1:  # norm_pix_loss of a one-value patch is NaN (its variance)
        norm_pix_loss = False
    problem = MAEProblem(
        batch=draw(st.integers(1, 2)),
        channels=channels,
        patch_size=patch_size,
        grid=draw(st.integers(1, 3)),
        heads=heads,
        head_dim=head_dim,
        depth=draw(st.integers(1, max_depth)),
        seed=draw(seeds()),
        mask_ratio=draw(st.floats(0.0, 1.0, exclude_max=True)),
        norm_pix_loss=draw(st.booleans()) if norm_pix_loss is None else norm_pix_loss,
    )
    note(str(problem))
    return problem


# Masking -----------------------------------------------------------------------------------------
RANDOM_MASKINGS = pytest.mark.parametrize(
    "random_masking", [official_mae.random_masking, mae.random_masking], ids=["reference", "fast"]
)


@st.composite
def noises(draw) -> torch.Tensor:
    """(B, L) distinct values per row, drawn as permutations of 0..L−1 scaled by a positive factor."""
    batch, patches, seed = draw(st.integers(1, 3)), draw(st.integers(1, 20)), draw(seeds())
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(patches, generator=generator) for _ in range(batch)]
    note(f"noise batch={batch}, patches={patches}, seed={seed}")
    return torch.stack(rows).double() * draw(log_uniform(1e-3, 1e3))


@RANDOM_MASKINGS
@given(noises(), st.floats(0.0, 1.0, exclude_max=True))
def test_random_masking_is_the_argsort_of_noise(random_masking, noise, mask_ratio):
    """Identities: ids_restore is the inverse of the permutation argsort(noise); ids_keep is its first
    kept = int(L·(1 − r)) entries (the release's formula, evaluated in double precision); mask is 0/1
    with exactly L − kept ones per row, 0 at ids_keep, and the masked patches are the highest-noise ones;
    ids_restore sends kept patches to [0, kept) and masked ones to [kept, L)."""
    B, L = noise.shape
    kept = int(L * (1 - mask_ratio))
    masking = random_masking(noise, mask_ratio)
    order = torch.argsort(noise, dim=1)
    assert torch.equal(torch.gather(masking.ids_restore, 1, order), torch.arange(L).expand(B, L))
    assert torch.equal(masking.ids_keep, order[:, :kept])
    mask = masking.mask
    assert mask.shape == (B, L) and bool(((mask == 0) | (mask == 1)).all())
    assert mask.sum(1).tolist() == [float(L - kept)] * B
    assert not bool(torch.gather(mask, 1, masking.ids_keep).any())
    if 0 < kept < L:
        masked_noise = torch.where(mask == 1, noise, torch.inf).amin(1)
        kept_noise = torch.where(mask == 0, noise, -torch.inf).amax(1)
        assert bool((masked_noise > kept_noise).all())
    assert torch.equal(masking.ids_restore >= kept, mask == 1)


@RANDOM_MASKINGS
def test_kept_count_is_the_released_floating_point_formula(random_masking):
    """int(L·(1 − r)) in double precision, as released, not the exact ⌊L(1 − r)⌋: for L = 10 and r = 0.9,
    1 − 0.9 = 0.09999999999999998, so no patch is kept (⌊1⌋ would keep one)."""
    masking = random_masking(torch.arange(10.0, dtype=torch.float64)[None], 0.9)
    assert masking.ids_keep.shape == (1, 0) and masking.mask.sum().item() == 10


@given(mae_problems(max_depth=1))
@scaled_settings(0.1)
def test_fast_embedding_equals_released_gather_and_unshuffle_bit_for_bit(problem):
    """CRATEMAE.embed (the mask token put in place by torch.where) equals the release's gather / cat
    mask tokens / unshuffle, then cls, then + pos, exactly: every entry is the same patch token or mask
    token plus the same position entry, one addition in both."""
    fast, ref = problem.fast(), problem.reference()
    images, noise = problem.images, problem.noise
    fast_masking = fast.random_masking(images, problem.mask_ratio, noise)
    ref_masking = official_mae.random_masking(noise, problem.mask_ratio)
    assert torch.equal(fast_masking.mask.double(), ref_masking.mask)
    with torch.no_grad():
        actual, expected = fast.embed(images, fast_masking), ref.encoder_input(images, ref_masking)
    note(f"max |fast − ref| = {max_abs(actual - expected):.3e}")
    assert torch.equal(actual, expected)


# The loss ------------------------------------------------------------------------------------------
def _loss_functions(problem: MAEProblem) -> dict:
    return {"reference": problem.reference().forward_loss, "fast": problem.fast().forward_loss}


@given(mae_problems(max_depth=1, norm_pix_loss=None), seeds(), st.data())
@scaled_settings(0.1)
def test_loss_counts_only_masked_patches(problem, pred_seed, data):
    """Identities of both forward_loss: pred changed on every kept patch leaves the loss bit for bit
    unchanged (their squared errors are multiplied by 0); pred changed on one masked patch j changes it
    by (e'_j − e_j)/#masked (a negative control: the loss does depend on pred), 1e-14·(loss + change);
    reference and fast agree bit for bit in float64 (the same operations). With and without norm_pix_loss,
    which mae_problems draws only for patches of two values at least (the unbiased variance of one value
    is NaN, and so is the loss, the release's too)."""
    mask = official_mae.random_masking(problem.noise, problem.mask_ratio).mask
    assume(0 < mask.sum() < mask.numel())
    images = problem.images
    generator = torch.Generator().manual_seed(pred_seed)
    pred = randn((problem.batch, problem.num_patches, problem.patch_size**2 * problem.channels), generator)
    kept = (mask == 0).unsqueeze(-1)
    changed_kept = torch.where(kept, pred + randn(pred.shape, generator), pred)
    masked = mask.nonzero()
    b, j = masked[data.draw(st.integers(0, len(masked) - 1), label="masked patch")].tolist()
    changed_masked = pred.clone()
    changed_masked[b, j] += 1 + randn(pred.shape[-1:], generator).abs()
    patch = _one_hot(mask, b, j)
    losses = {}
    for name, forward_loss in _loss_functions(problem).items():
        with torch.no_grad():
            loss = forward_loss(images, pred, mask)
            assert torch.equal(forward_loss(images, changed_kept, mask), loss), f"{name}: kept patch counted"
            change = forward_loss(images, changed_masked, mask) - loss
            patch_change = forward_loss(images, changed_masked, patch) - forward_loss(images, pred, patch)
        assert patch_change.item() != 0, f"{name}: the masked patch's squared error did not change"
        expected = patch_change / mask.sum()
        tolerance = 1e-14 * (abs(loss.item()) + abs(expected.item()))
        assert_within(abs((change - expected).item()), tolerance, f"{name}: change vs (e'_j − e_j)/#masked")
        losses[name] = loss
    assert torch.equal(losses["fast"], losses["reference"])


def _one_hot(mask: torch.Tensor, b: int, j: int) -> torch.Tensor:
    """A mask with patch j of image b alone masked: its loss is that patch's mean squared error."""
    single = torch.zeros_like(mask)
    single[b, j] = 1
    return single


# The fast model against the released one -----------------------------------------------------------
def _float64_tolerance(ref: torch.Tensor) -> float:
    """fast vs reference in float64, as rows 27-28 (test_fast_model.py): 1e-10·(1 + max|ref|)."""
    return 1e-10 * (1 + max_abs(ref))


@given(mae_problems(norm_pix_loss=None))
@scaled_settings(0.1)
def test_fast_mae_equals_released_reference_in_float64(problem):
    """CRATEMAE (fused_attn=False, float64, the released weights loaded) equals OfficialCRATEMAE: the
    loss (NaN in both when no patch is masked), pred, mask and every layer's stream (encoder input /
    after MSSA / after ISTA, decoder input / after the linear step / after −MSSA), within
    1e-10·(1 + max|ref|)."""
    fast, ref = problem.fast(), problem.reference()
    images, noise, ratio = problem.images, problem.noise, problem.mask_ratio
    with torch.no_grad():
        loss, pred, mask = fast(images, ratio, noise)
        ref_loss, ref_pred, ref_mask = ref(images, noise, ratio)
        masking = official_mae.random_masking(noise, ratio)
        encoder, decoder = fast.layer_states(images, fast.random_masking(images, ratio, noise))
        ref_encoder = ref.encoder_states(ref.encoder_input(images, masking))
        ref_decoder = ref.decoder_states(ref.forward_encoder(images, masking))
    assert torch.equal(mask.double(), ref_mask)
    assert_close(pred, ref_pred, _float64_tolerance(ref_pred), "pred")
    if ref_mask.any():
        assert_close(loss, ref_loss, _float64_tolerance(ref_loss), "loss")
    else:  # nothing masked: 0/0, as released
        assert loss.isnan() and ref_loss.isnan()
    for side, states, ref_states in (("encoder", encoder, ref_encoder), ("decoder", decoder, ref_decoder)):
        for layer, (state, ref_state) in enumerate(zip(states, ref_states, strict=True)):
            for tensor, ref_tensor, name in zip(state[:3], ref_state, ref_state._fields, strict=True):
                assert_close(tensor, ref_tensor, _float64_tolerance(ref_tensor), f"{side} {layer} {name}")


@given(mae_problems())
@scaled_settings(0.1)
def test_encoder_classifier_features_equal_autoencoder_features(problem):
    """CRATEMAEEncoder loaded from encoder_state_dict(mae.state_dict()): fc_norm(forward_features) is
    CRATEMAE.forward_features (its encoder on every patch, then its norm), bit for bit: the same
    modules and operations."""
    fast = problem.fast()
    encoder = mae.CRATEMAEEncoder(problem.config(), num_classes=0).double().eval()
    encoder.load_state_dict(mae.encoder_state_dict(fast.state_dict()), strict=True)
    with torch.no_grad():
        actual = encoder.fc_norm(encoder.forward_features(problem.images))
        expected = fast.forward_features(problem.images)
    note(f"max |encoder − autoencoder| = {max_abs(actual - expected):.3e}")
    assert torch.equal(actual, expected)


# The round trip (empirical; its bookkeeping only) -----------------------------------------------------
def _permutation_round_trip_model(depth: int) -> official_mae.OfficialCRATEMAE:
    """A released model whose every encoder layer ℓ is z ↦ ReLU(P_ℓᵀz) (MSSA's W_out = 0, LayerNorms
    removed, D = P_ℓ a permutation, η = 1, λ = 0) and decoder layer L−1−ℓ is u ↦ P_ℓu (W = P_ℓ, MSSA's
    W_out = 0): permutations are orthogonal and keep z >= 0, so every round trip is exact, and for
    distinct P_ℓ only the mirrored pairing is."""
    dim = 4
    state = official_mae.random_official_mae_state_dict(
        dim=dim, depth=depth, heads=2, head_dim=2, patch_size=1, channels=1, num_patches=4
    )
    model = official_mae.OfficialCRATEMAE.from_state_dict(state, heads=2, eta=1.0, lam=0.0)
    permutations = [torch.eye(dim, dtype=torch.float64).roll(layer + 1, dims=0) for layer in range(depth)]
    with torch.no_grad():
        for layer, (encoder, decoder) in enumerate(
            zip(model.blocks, reversed(model.decoder_blocks), strict=True)
        ):
            for mssa, dictionary in (encoder.layers[0], reversed(decoder.layers[0])):
                mssa.norm = dictionary.norm = nn.Identity()
                mssa.fn.to_out[0].weight.zero_()
                mssa.fn.to_out[0].bias.zero_()
                dictionary.fn.weight.copy_(permutations[layer])
    return model


def test_round_trip_errors_are_zero_where_the_decoder_inverts_the_encoder():
    """The measurement is ~0 (1e-15: a few roundings of permuted entries) on the exact construction, and
    not where encoder layer ℓ is paired with decoder layer ℓ instead of L−1−ℓ (a control: the function
    pairs the layers as it says)."""
    model = _permutation_round_trip_model(depth=3)
    x = randn((2, 5, 4), torch.Generator().manual_seed(0)).abs()
    assert_within(max_abs(reference_round_trip_errors(model, x)), 1e-15, "exact round trip error")
    with torch.no_grad():
        unmirrored = round_trip_errors(
            [lambda z, block=block: block.states(z).output for block in model.blocks],
            [lambda z, block=block: block.states(z).output for block in reversed(model.decoder_blocks)],
            x,
        )
    assert unmirrored[0] > 0.1 and unmirrored[2] > 0.1, unmirrored


@given(mae_problems())
@scaled_settings(0.05)
def test_fast_round_trip_errors_equal_reference_ones(problem):
    """fast_round_trip_errors (the fast model's embedding, its blocks) = reference_round_trip_errors on
    the released encoder input, within 1e-10·(1 + error)."""
    fast, ref = problem.fast(), problem.reference()
    images, noise = problem.images, problem.noise
    actual = fast_round_trip_errors(fast, images, fast.random_masking(images, problem.mask_ratio, noise))
    expected = reference_round_trip_errors(
        ref, ref.encoder_input(images, official_mae.random_masking(noise, problem.mask_ratio))
    )
    assert_close(actual, expected, _float64_tolerance(expected), "fast vs reference round-trip errors")
