"""Position-embedding resampling, when a checkpoint of one patch grid is loaded into a model of another
(``convert_official_state_dict(state, model)``, hence ``load_official_state_dict`` and ``crate audit``;
and ``crate.weights.sources.load_for_finetuning``, hence ``crate train --finetune``), for both families.

Exact: the same grid leaves the embedding bit-identical; the cls row is never touched. A state dict
does not record its grid: one with the model's token count is taken to be on the model's grid (a
released checkpoint's g × g grid loaded into a model of h × w = g² patches, h ≠ w, is not resampled),
so the resampling is checked where the counts differ.
Approximation, checked against an independent interpolation: the patch rows, on the old g × g grid
(row-major), are resampled to the model's h × w grid by separable bicubic interpolation with
antialiasing (timm's resample_abs_pos_embed default, PyTorch's antialiased bicubic = PIL's): the
cubic convolution kernel with a = −0.5, stretched by the scale when shrinking, each output's weights
normalised to sum 1 over the input samples inside the support. ``_weights`` below writes that
definition out in float64. timm interpolates in float32, so the tolerance is float32 rounding: each
weight is off by a few u₃₂ = 2⁻²⁴ relative to the weights' sum 1 (not to itself: a weight of 0.045
was measured 2e-7 off), and each of the two passes sums k taps. Entry by entry, |error| <=
8(k_h + k_w)·u₃₂·(S_h |P| S_wᵀ), S = |M| + the support (1 at every tap of the window, weight 0
included), k the taps per output (measured worst error 0.041 of it over the CI examples); a wrong
orientation, kernel or mode is off by O(1) relative.

Found by this test: PyTorch's antialiased F.interpolate returns its first output row for every row
of an h × 1 output (h > 1); crate.models.released.resample_position_embedding works around it.
"""

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import reference
from crate import CRATE, CRATEAlpha, convert_official_state_dict
from crate.weights.sources import Source, load_for_finetuning
from verification.strategies import scaled_settings

U32 = 2.0**-24
PATCH, CHANNELS, CLASSES = 2, 2, 3


def _cubic(x: float, a: float = -0.5) -> float:
    """Keys' cubic convolution kernel, support [−2, 2]."""
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return a * (((x - 5) * x + 8) * x - 4)
    return 0.0


def _weights(old: int, new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, support), each (new, old) float64: output i (centre at (i + ½)·old/new in input coordinates)
    takes input j with weight cubic((j + ½ − centre)/stretch), stretch = max(old/new, 1), over the
    inputs within 2·stretch of the centre (its support), normalised to sum 1."""
    scale = old / new
    stretch = max(scale, 1.0)
    matrix, support = torch.zeros(new, old, dtype=torch.float64), torch.zeros(new, old, dtype=torch.float64)
    for i in range(new):
        centre = scale * (i + 0.5)
        low, high = max(int(centre - 2 * stretch + 0.5), 0), min(int(centre + 2 * stretch + 0.5), old)
        taps = torch.tensor(
            [_cubic((j + 0.5 - centre) / stretch) for j in range(low, high)], dtype=torch.float64
        )
        matrix[i, low:high] = taps / taps.sum()
        support[i, low:high] = 1
    return matrix, support


def _expected(pos_embed: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(resampled patch rows (h·w, d), tolerance of each) for a (1, 1 + g², d) embedding."""
    old = math.isqrt(pos_embed.shape[1] - 1)
    patches = pos_embed[0, 1:].unflatten(0, (old, old)).permute(2, 0, 1)  # (d, g, g): [c, row, column]
    (rows, row_support), (columns, column_support) = _weights(old, grid[0]), _weights(old, grid[1])
    resampled = rows @ patches @ columns.T  # (d, h, w)
    taps = int(row_support.sum(1).max() + column_support.sum(1).max())
    scale = (rows.abs() + row_support) @ patches.abs() @ (columns.abs() + column_support).T
    flat = lambda t: t.permute(1, 2, 0).flatten(0, 1)  # noqa: E731 -- (d, h, w) -> (h·w, d), row-major
    return flat(resampled), flat(8 * taps * U32 * scale)


def _released_state(family: str, grid: int, dim: int, seed: int) -> dict:
    draw = (
        reference.random_official_state_dict
        if family == "crate"
        else reference.random_official_alpha_state_dict
    )
    sizes = dict(
        dim=dim,
        depth=1,
        heads=1,
        head_dim=dim,
        patch_size=PATCH,
        channels=CHANNELS,
        num_patches=grid * grid,
        num_classes=CLASSES,
    )
    return draw(**sizes, generator=torch.Generator().manual_seed(seed))


def _model(family: str, grid: tuple[int, int], dim: int):
    model_class = CRATE if family == "crate" else CRATEAlpha
    image = (grid[0] * PATCH, grid[1] * PATCH)
    return model_class(
        img_size=image, patch_size=PATCH, in_chans=CHANNELS, num_classes=CLASSES, dim=dim, depth=1, heads=1
    ).double()


def _loaded_position_embedding(loader: str, state: dict, model) -> torch.Tensor:
    """The position embedding a model gets from a released-layout state dict; fine-tuning must also
    load every other tensor as it is and leave the classifier as initialised."""
    if loader == "convert":
        return convert_official_state_dict(state, model)["pos_embed"]
    source = convert_official_state_dict(state)
    fresh_head = {key: value.clone() for key, value in model.head.state_dict().items()}
    load_for_finetuning(model, Source(source, None, "a test state dict"))
    for key, value in model.state_dict().items():  # the rest loaded as is, the classifier left fresh
        expected = fresh_head[key.removeprefix("head.")] if key.startswith("head.") else source[key]
        assert key == "pos_embed" or torch.equal(value, expected), f"fine-tuning loaded {key} wrongly"
    return model.pos_embed.detach()


FAMILIES = pytest.mark.parametrize("family", ["crate", "alpha"])
LOADERS = pytest.mark.parametrize("loader", ["convert", "finetune"])


@FAMILIES
@LOADERS
@pytest.mark.parametrize("grid", [1, 3, 4])
def test_same_grid_leaves_position_embedding_bit_identical(family, loader, grid):
    state = _released_state(family, grid, dim=5, seed=grid)
    pos_embed = _loaded_position_embedding(loader, state, _model(family, (grid, grid), dim=5))
    assert torch.equal(pos_embed, state["pos_embedding"])


@FAMILIES
@LOADERS
@scaled_settings(0.1)
@given(
    old=st.integers(1, 6),
    new=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    dim=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_other_grid_is_independent_bicubic_interpolation_with_cls_row_kept(
    family, loader, old, new, dim, seed
):
    """Old g × g grid to any h × w (shrinking, growing, non-square) of another token count."""
    assume(new[0] * new[1] != old * old)
    state = _released_state(family, old, dim, seed)
    pos_embed = _loaded_position_embedding(loader, state, _model(family, new, dim))
    assert pos_embed.shape == (1, 1 + new[0] * new[1], dim)
    assert torch.equal(pos_embed[0, 0], state["pos_embedding"][0, 0]), "the cls row changed"
    expected, tolerance = _expected(state["pos_embedding"], new)
    error = (pos_embed[0, 1:] - expected).abs()
    worst = (error / tolerance).max().item()
    print(f"{old}×{old} -> {new}: worst error / tolerance {worst:.3g}")
    assert worst <= 1, f"resampled {old}×{old} -> {new}: error {worst:.3g} × the tolerance"
