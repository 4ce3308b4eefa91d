"""crate/models/recompute.py: a training step that keeps the LayerNorms' inputs and recomputes their outputs
in the backward computes exactly what the plain step computes, and keeps less.

Exact (bitwise): the recomputation is the forward's operation on the same input, so every gradient is
the plain path's, in float64, float32 and under bf16 autocast, for CRATE and CRATE-α, with drop-path.
Memory: the norms' outputs are not kept alive by the autograd graph (the plain path keeps them), and
gradient checkpointing, which recomputes everything, runs without the recipes.
"""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

from crate import CRATE, CRATEAlpha
from crate.models.recompute import norm_outputs_recomputed
from verification.strategies import seeds

PRECISIONS = ["float64", "float32", "bf16-autocast"]


def build(family: str, dim: int, heads: int, depth: int, drop_path: float, seed: int) -> CRATE:
    torch.manual_seed(seed)
    model_class = CRATEAlpha if family == "alpha" else CRATE
    kwargs = dict(img_size=8, patch_size=4, dim=dim, heads=heads, depth=depth, num_classes=3)
    return model_class(drop_path_rate=drop_path, **kwargs).train()


def gradients(model: CRATE, images: torch.Tensor, precision: str, recompute: bool, seed: int) -> list:
    model.recompute_norms = recompute
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same drop-path draws on both paths
    with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16-autocast"):
        logits = model(images)
    F.cross_entropy(logits.float(), torch.arange(len(images)) % 3).backward()
    return [(name, p.grad) for name, p in model.named_parameters()]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("family", ["crate", "alpha"])
@given(
    batch=st.integers(1, 3),
    heads=st.integers(1, 3),
    head_dim=st.integers(1, 6),
    depth=st.integers(1, 3),
    drop_path=st.sampled_from([0.0, 0.5]),
    seed=seeds(),
)
@example(batch=1, heads=1, head_dim=1, depth=1, drop_path=0.0, seed=0)  # d = 1: every LN output is β
def test_recomputed_norms_give_the_plain_gradients_bitwise(
    family, precision, batch, heads, head_dim, depth, drop_path, seed
):
    """Identity, asserted bitwise: the same operation on the same input gives the same bits."""
    model = build(family, heads * head_dim, heads, depth, drop_path, seed)
    if precision == "float64":
        model.double()
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 8, 8, generator=generator, dtype=next(model.parameters()).dtype)
    plain = gradients(model, images, precision, recompute=False, seed=seed)
    recomputed = gradients(model, images, precision, recompute=True, seed=seed)
    for (name, expected), (_, actual) in zip(plain, recomputed, strict=True):
        assert torch.equal(actual, expected), f"{name}: max difference {(actual - expected).abs().max()}"


def weak_outputs(modules: list[torch.nn.Module], model: CRATE) -> tuple[torch.Tensor, list]:
    """The model's logits on random images, and weak references to what each module output."""
    outputs = []
    handles = [m.register_forward_hook(lambda m, a, out: outputs.append(weakref.ref(out))) for m in modules]
    logits = model(torch.randn(2, 3, 8, 8))
    for handle in handles:
        handle.remove()
    assert len(outputs) == len(modules)
    return logits, outputs


def norm_outputs_alive_after_forward(model: CRATE, recompute: bool) -> int:
    """How many of the blocks' LayerNorm outputs are still alive while the loss's graph is."""
    model.recompute_norms = recompute
    norms = [norm for block in model.blocks for norm in (block.norm1, block.norm2)]
    logits, outputs = weak_outputs(norms, model)
    gc.collect()
    alive = sum(reference() is not None for reference in outputs)
    logits.sum().backward()
    return alive


@pytest.mark.parametrize("family", ["crate", "alpha"])
def test_norm_outputs_are_not_kept_for_the_backward(family):
    """Exact counts: the plain graph keeps every norm output (control), the recomputing one none."""
    model = build(family, dim=8, heads=2, depth=3, drop_path=0.0, seed=0)
    assert norm_outputs_alive_after_forward(model, recompute=False) == 6
    assert norm_outputs_alive_after_forward(model, recompute=True) == 0


def test_gradient_checkpointing_runs_without_the_recipes():
    """Checkpointing recomputes the whole block itself; stacking the recipes' hooks inside its own would
    replace them. Its gradients are the plain ones, bitwise."""
    model = build("crate", dim=8, heads=2, depth=2, drop_path=0.0, seed=0)
    images = torch.randn(2, 3, 8, 8)
    plain = gradients(model, images, "float32", recompute=False, seed=0)
    model.set_grad_checkpointing()
    checkpointed = gradients(model, images, "float32", recompute=True, seed=0)
    for (name, expected), (_, actual) in zip(plain, checkpointed, strict=True):
        assert torch.equal(actual, expected), name


def test_a_saved_view_of_a_norm_output_is_rebuilt_with_its_geometry():
    """A product that saves a transposed, offset view of the norm's output gets that view back, and a
    tensor that is not a norm output is saved as it is."""
    torch.manual_seed(0)
    norm, x, weight = torch.nn.LayerNorm(5), torch.randn(4, 5), torch.randn(3, 4, requires_grad=True)

    def loss():
        y = norm(x)
        other = torch.randn(3, 3, requires_grad=True)
        return ((y.T[1:4] * weight).sum(1) @ other).sum()  # mul saves y.T[1:4] (and weight), @ saves other

    torch.manual_seed(1)
    (expected,) = torch.autograd.grad(loss(), weight)
    torch.manual_seed(1)
    with norm_outputs_recomputed(norm):
        result = loss()
    (actual,) = torch.autograd.grad(result, weight)
    assert torch.equal(actual, expected)


def test_recomputation_replays_the_forwards_autocast_state():
    """The backward runs outside autocast; a module whose result autocast changes (on the CPU a product,
    computed in bf16 under autocast; CUDA's autocast also changes LayerNorm on bf16 inputs) must be
    recomputed under the forward's autocast state."""
    torch.manual_seed(0)
    module, x = torch.nn.Linear(16, 16), torch.randn(4, 16)
    weight = torch.randn(4, 16, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        expected = torch.autograd.grad((module(x) * weight).sum(), weight)[0]  # mul saves the bf16 output
        with norm_outputs_recomputed(module):
            result = (module(x) * weight).sum()
    (actual,) = torch.autograd.grad(result, weight)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("family", ["crate", "alpha"])
def test_a_forward_without_backward_frees_every_layer_output(family):
    """A forward with autograd on and no backward (timm's contract tests run such) must free its graph
    with its output. A block saves outputs of the very operations that save them (ReLU keeps its
    result); packed as themselves they would hold their own nodes, cycles through C++ that Python's
    collector never frees, and the layers' activations with them (130 MiB per CRATE-S forward here,
    until the slow test suite was killed out of memory). Every block's output must die with the logits."""
    model = build(family, dim=8, heads=2, depth=2, drop_path=0.0, seed=0).eval()
    logits, outputs = weak_outputs(list(model.blocks), model)
    del logits
    gc.collect()
    assert [reference() is None for reference in outputs] == [True, True]
