"""The float64 released CRATE-α (reference.OfficialCRATEAlpha) against an independent functional
implementation read straight from a released-layout state dict (docs/crate-alpha.md §1, §4): patches
by F.conv2d, attention by F.scaled_dot_product_attention, LayerNorm by F.layer_norm (eps 1e-6 in the
blocks, 1e-5 in the head), the ODL block's two steps as token-major matmuls (no einsum)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import example, given, note
from hypothesis import strategies as st

import reference
from verification.asserts import assert_close, max_abs
from verification.strategies import log_uniform, randn, randomise_affine, scaled_settings, seeds

BLOCK_EPS, HEAD_EPS = 1e-6, 1e-5


def _layer_norm(x: torch.Tensor, state: dict, key: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], state[key + ".weight"], state[key + ".bias"], eps=eps)


def functional_crate_alpha(state: dict, images: torch.Tensor, heads: int, eta: float, lam: float):
    """(logits, [(input, after MSSA, after ODL) per layer]) of the released CRATE-α, from ``state``."""
    weight = state["conv1.weight"]
    patches = F.conv2d(images, weight, state["conv1.bias"], stride=weight.shape[-1])  # (B, d, h, w)
    B, dim = patches.shape[:2]
    x = patches.permute(0, 2, 3, 1).reshape(B, -1, dim)  # row-major over the grid
    x = torch.cat([state["cls_token"].expand(B, 1, dim), x], dim=1)
    x = x + state["pos_embedding"][:, : x.shape[1]]
    states, layer = [], 0
    while f"transformer.layers.{layer}.0.fn.qkv.weight" in state:
        key = f"transformer.layers.{layer}."
        y = _layer_norm(x, state, key + "0.norm", BLOCK_EPS)
        w = (y @ state[key + "0.fn.qkv.weight"].T).unflatten(-1, (heads, -1)).permute(0, 2, 1, 3)
        o = F.scaled_dot_product_attention(w, w, w).permute(0, 2, 1, 3).flatten(-2)  # scale p^{-½}
        if key + "0.fn.to_out.0.weight" in state:
            o = o @ state[key + "0.fn.to_out.0.weight"].T
        z_half = x + o
        u = _layer_norm(z_half, state, key + "1.norm", BLOCK_EPS)
        D, D1 = state[key + "1.fn.D"], state[key + "1.fn.D1"]
        a1 = F.relu(eta * u @ D - eta * lam)
        a2 = F.relu(a1 - eta * (a1 @ D.T - u) @ D - eta * lam)
        z_next = z_half + a2 @ D1.T
        states.append((x, z_half, z_next))
        x, layer = z_next, layer + 1
    pooled = _layer_norm(x[:, 0], state, "mlp_head.0", HEAD_EPS)
    return pooled @ state["mlp_head.1.weight"].T + state["mlp_head.1.bias"], states


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
        expected_logits, expected_states = functional_crate_alpha(
            state, images, problem.heads, problem.eta, problem.lam
        )
        logits, states = model(images), model.forward_intermediates(images)
    assert_close(logits, expected_logits, 1e-12 * (1 + max_abs(expected_logits)), "logits")
    assert len(states) == len(expected_states) == problem.depth
    for layer, (actual, expected) in enumerate(zip(states, expected_states, strict=True)):
        for name, a, e in zip(("input", "after MSSA", "after ODL"), actual, expected, strict=True):
            assert_close(a, e, 1e-12 * (1 + max_abs(e)), f"layer {layer} {name}")
