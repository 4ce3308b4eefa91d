"""The float64 released CRATE-α (reference.OfficialCRATEAlpha) against an independent functional
implementation read straight from a released-layout state dict (docs/crate-alpha.md §1, §4):
crate/verify/plain_alpha.py with SDPA attention, that is patches by F.conv2d, attention by
F.scaled_dot_product_attention, LayerNorm by F.layer_norm (eps 1e-6 in the blocks, 1e-5 in the head),
the ODL block's two steps as token-major matmuls (no einsum)."""

from dataclasses import dataclass

import torch
from hypothesis import example, given, note
from hypothesis import strategies as st

import reference
from crate.verify import plain_alpha
from verification.asserts import assert_close, max_abs
from verification.strategies import log_uniform, randn, randomise_affine, scaled_settings, seeds


@dataclass(frozen=True)
class AlphaProblem:
    heads: int
    head_dim: int
    dim: int
    depth: int
    patch_size: int
    channels: int
    grid: tuple[int, int]
    spare_positions: int  # position embeddings beyond the image's patches (sliced off, as released)
    ratio: int
    num_classes: int
    batch: int
    eta: float
    lam: float
    seed: int

    def state_dict(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        state = reference.random_official_alpha_state_dict(
            dim=self.dim,
            depth=self.depth,
            heads=self.heads,
            head_dim=self.head_dim,
            patch_size=self.patch_size,
            channels=self.channels,
            num_patches=self.grid[0] * self.grid[1] + self.spare_positions,
            num_classes=self.num_classes,
            ratio=self.ratio,
            generator=generator,
        )
        state = randomise_affine(state, generator)
        return state


@st.composite
def alpha_problems(draw) -> AlphaProblem:
    heads = draw(st.integers(1, 3))
    head_dim = draw(st.integers(-(-4 // heads), 5))  # K·p >= 4
    problem = AlphaProblem(
        heads=heads,
        head_dim=head_dim,
        # d >= 4 (LayerNorm over d <= 2 maps every token to nearly the same values, hiding errors);
        # mostly K·p = d as released, sometimes not (then one head has to_out even when p = d)
        dim=draw(st.one_of(st.just(heads * head_dim), st.integers(4, 8))),
        depth=draw(st.integers(1, 3)),
        patch_size=draw(st.integers(1, 3)),
        channels=draw(st.integers(2, 3)),  # more than one, or a wrong (c, p1, p2) order would go unseen
        grid=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
        spare_positions=draw(st.integers(0, 2)),
        ratio=draw(st.integers(1, 4)),
        num_classes=draw(st.integers(1, 4)),
        batch=draw(st.integers(1, 2)),
        eta=draw(log_uniform(0.03, 0.3)),  # η ≠ λ, so that swapping them is caught
        lam=draw(st.floats(0.0, 0.3)),
        seed=draw(seeds()),
    )
    note(str(problem))
    return problem


@scaled_settings(0.2)
@given(alpha_problems())
@example(AlphaProblem(1, 4, 4, 2, 2, 3, (2, 3), 0, 4, 3, 2, 0.1, 0.05, 0))  # one head of full width
@example(AlphaProblem(3, 2, 6, 2, 2, 2, (3, 2), 1, 4, 2, 1, 0.2, 0.1, 1))  # released ratio, spare position
def test_official_alpha_equals_independent_functional_implementation(problem):
    """Logits and every layer's (input, after MSSA, after ODL) agree within 1e-12·(1 + max|expected|),
    random models with randomised LayerNorm affine and biases, float64."""
    generator = torch.Generator().manual_seed(problem.seed)
    state = problem.state_dict(generator)
    model = reference.OfficialCRATEAlpha.from_state_dict(
        state, heads=problem.heads, eta=problem.eta, lam=problem.lam
    )
    P = problem.patch_size
    images = randn((problem.batch, problem.channels, problem.grid[0] * P, problem.grid[1] * P), generator)
    with torch.no_grad():
        expected_states = plain_alpha.layer_states(
            state, images, problem.heads, "sdpa", problem.eta, problem.lam
        )
        expected_logits = plain_alpha.head(state, expected_states[-1][-1])
        logits, states = model(images), model.forward_intermediates(images)
    assert_close(logits, expected_logits, 1e-12 * (1 + max_abs(expected_logits)), "logits")
    assert len(states) == len(expected_states) == problem.depth
    for layer, (actual, expected) in enumerate(zip(states, expected_states, strict=True)):
        for name, a, e in zip(("input", "after MSSA", "after ODL"), actual, expected, strict=True):
            assert_close(a, e, 1e-12 * (1 + max_abs(e)), f"layer {layer} {name}")
