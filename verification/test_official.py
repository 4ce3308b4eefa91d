"""The float64 official architecture (reference.OfficialCRATE) against an independent functional
implementation read straight from the state dict: patches by F.unfold, attention by
F.scaled_dot_product_attention, every other step by torch.nn.functional (docs/math.md §5, §6: measured
3.6e-15). Also the measurement convention of the official tool (docs/math.md §7)."""

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import reference
from crate.verify import plain
from verification.asserts import assert_close, max_abs
from verification.strategies import head_problems, randn, randomise_affine, seeds


@given(
    st.integers(1, 3),
    st.integers(1, 5),
    st.integers(1, 3),
    st.sampled_from([(1, 2), (3, 1), (2, 3)]),
    st.integers(1, 4),
    st.sampled_from([(4, 4), (6, 4), (4, 8)]),
    seeds(),
)
def test_official_reference_equals_independent_functional_implementation(
    heads, head_dim, depth, patch_and_channels, num_classes, grid, seed
):
    """Logits agree within 1e-12·(1 + max|logits|) for random models with randomised LN affine.
    d >= 4: LayerNorm over d <= 2 maps every token to nearly the same two values, hiding differences."""
    assume(heads * head_dim >= 4)
    patch_size, channels = patch_and_channels
    H, W = grid[0] * patch_size // 2, grid[1] * patch_size // 2
    H, W = max(H, patch_size), max(W, patch_size)
    num_patches = (H // patch_size) * (W // patch_size)
    generator = torch.Generator().manual_seed(seed)
    state = reference.random_official_state_dict(
        dim=heads * head_dim,
        depth=depth,
        heads=heads,
        head_dim=head_dim,
        patch_size=patch_size,
        channels=channels,
        num_patches=num_patches,
        num_classes=num_classes,
        generator=generator,
    )
    state = randomise_affine(state, generator)
    model = reference.OfficialCRATE.from_state_dict(
        state, heads=heads, patch_size=patch_size, channels=channels
    )
    images = randn((2, channels, H, W), generator)
    with torch.no_grad():
        expected = plain.logits(state, images, heads, patch_size, attention="sdpa")
        actual = model(images)
    assert_close(actual, expected, 1e-12 * (1 + max_abs(expected)), "OfficialCRATE vs functional")


# docs/math.md §7 -------------------------------------------------------------------------------------
def _official_tool_compression(W: torch.Tensor) -> torch.Tensor:
    """The official measurement: head-tokens W (B, K, N, p) ℓ2-normalised, then
    Σ_k ½logdet(I_N + p/(N·0.01)·Ŵ_kŴ_kᵀ) on the token side."""
    N, p = W.shape[-2:]
    normalised = W / W.norm(dim=-1, keepdim=True)
    eye = torch.eye(N, dtype=W.dtype)
    return 0.5 * torch.linalg.slogdet(eye + p / (N * 0.01) * normalised @ normalised.transpose(-1, -2))[
        1
    ].sum(-1)


@given(head_problems(scales=(1e-1, 10.0)))
def test_normalised_compression_rate_equals_official_measurement(problem):
    """compression_rate(..., eps=0.1, normalize=True) = the official tool's number, 1e-12 relative."""
    W = torch.einsum("bnd,kdp->bknp", problem.Z, problem.U)
    expected = _official_tool_compression(W)
    actual = reference.compression_rate(problem.Z, problem.U, 0.1, normalize=True)
    assert_close(actual, expected, 1e-12 * (1 + max_abs(expected)), "normalised R^c vs official tool")
