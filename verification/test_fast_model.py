"""The fast model (crate/) equals the float64 reference (reference.OfficialCRATE), layer by layer and
whole, forward and backward, in every precision it supports (math.md §8; rows 27 and 28).

float64: max|fast − ref| <= 1e-10·(1 + max|ref|) (measured ~3e-15). Low precision: the FlashAttention
rule of verification/precision.py. Each precision runs with fused (SDPA) and explicit attention; CUDA
cases (TF32 off and on) run where a GPU is present and are skipped otherwise.
"""

import pytest
import torch
from hypothesis import given

import reference
from crate import convert_official_state_dict
from verification import plain
from verification.asserts import assert_close, assert_within
from verification.precision import PRECISIONS, autocast, errors, fast_model, layer_gradients, layer_results
from verification.strategies import OfficialProblem, official_problems, scaled_settings

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU"))]
LOW_PRECISIONS = ["float32", "bfloat16", "float16", "bf16-autocast"]
FUSED = pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
CRATE_T_LAYER = dict(batch=2, tokens=197, heads=6, head_dim=64, depth=1, scale=1.0)


def _float64_tolerance(ref: torch.Tensor) -> float:
    return 1e-10 * (1 + ref.abs().max().item())


def _assert_rule(result, what: str) -> None:
    __tracebackhide__ = True
    print(f"{what}: {result}")
    assert_within(result.fast, result.bound, f"{what}: fast error vs 2·plain + 4u(1 + max|ref|) [{result}]")


def _kwargs(problem: OfficialProblem, precision: str, fused: bool, device: str = "cpu") -> dict:
    return dict(
        heads=problem.heads,
        patch_size=problem.patch_size,
        channels=problem.channels,
        precision=precision,
        fused=fused,
        device=device,
    )


def _fast(problem: OfficialProblem, state: dict, dtype: torch.dtype, fused: bool, device: str = "cpu"):
    return fast_model(
        state,
        heads=problem.heads,
        patch_size=problem.patch_size,
        channels=problem.channels,
        fused=fused,
        dtype=dtype,
        device=device,
    )


# float64: the algebra ---------------------------------------------------------------------------
@FUSED
@scaled_settings(0.3)
@given(official_problems(peaky=True))
def test_fast_layers_equal_reference_in_float64(fused, problem):
    for layer, result in enumerate(
        layer_results(problem.state_dict(), problem.X, **_kwargs(problem, "float64", fused))
    ):
        assert_close(
            result.fast_half, result.ref_half, _float64_tolerance(result.ref_half), f"layer {layer} MSSA"
        )
        assert_close(
            result.fast_out, result.ref_out, _float64_tolerance(result.ref_out), f"layer {layer} ISTA"
        )


@FUSED
@scaled_settings(0.3)
@given(official_problems(peaky=True))
def test_fast_model_equals_reference_in_float64(fused, problem):
    """Logits and every forward_intermediates state, from an official state dict converted."""
    state = problem.state_dict()
    ref_model = problem.model()
    model = _fast(problem, state, torch.float64, fused)
    images = problem.images
    with torch.no_grad():
        expected_states = ref_model.forward_intermediates(images)
        expected = ref_model(images)
        states = model.forward_intermediates(images, intermediates_only=True, return_layer_states=True)
        actual = model(images)
    assert_close(actual, expected, _float64_tolerance(expected), "logits")
    for layer, (fast, ref) in enumerate(zip(states, expected_states, strict=True)):
        for name in ("input", "mssa", "ista"):
            ref_value = getattr(ref, name)
            assert_close(
                getattr(fast, name), ref_value, _float64_tolerance(ref_value), f"layer {layer} {name}"
            )


@FUSED
@scaled_settings(0.2)
@given(official_problems(peaky=True, max_depth=2))
def test_fast_model_gradients_equal_reference_in_float64(fused, problem):
    """∇ of ⟨logits, g⟩ w.r.t. the images and every parameter, matched by official name."""
    state = problem.state_dict()
    ref_model = problem.model()
    model = _fast(problem, state, torch.float64, fused)
    fast_names = dict(zip(state, convert_official_state_dict(state), strict=True))
    images = problem.images.requires_grad_(True)
    g = torch.randn(
        problem.batch, problem.num_classes, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    names = list(state)
    ref_grads = torch.autograd.grad(
        (ref_model(images) * g).sum(), [images] + [ref_model.get_parameter(n) for n in names]
    )
    fast_grads = torch.autograd.grad(
        (model(images) * g).sum(), [images] + [model.get_parameter(fast_names[n]) for n in names]
    )
    for name, fast, ref in zip(["images", *names], fast_grads, ref_grads, strict=True):
        assert_close(fast, ref, _float64_tolerance(ref), f"gradient of {name}")


# low precision: the FlashAttention rule -----------------------------------------------------------
@pytest.mark.parametrize("precision", LOW_PRECISIONS)
@FUSED
@scaled_settings(0.1)
@given(official_problems(peaky=True, max_head_dim=8))
def test_fast_layers_follow_precision_rule(precision, fused, problem):
    u = PRECISIONS[precision][2]
    for layer, result in enumerate(
        layer_results(problem.state_dict(), problem.X, **_kwargs(problem, precision, fused))
    ):
        _assert_rule(errors(result.fast_half, result.plain_half, result.ref_half, u), f"layer {layer} MSSA")
        _assert_rule(errors(result.fast_out, result.plain_out, result.ref_out, u), f"layer {layer} ISTA")


def _crate_t_precisions():
    cases = [(precision, "cpu") for precision in LOW_PRECISIONS]
    cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
    return cases + [pytest.param(p, "cuda", marks=cuda) for p in [*LOW_PRECISIONS, "tf32"]]


@pytest.mark.parametrize("precision, device", _crate_t_precisions())
@pytest.mark.parametrize("peaky", [False, True], ids=["soft", "peaky"])
@FUSED
def test_fast_layer_follows_precision_rule_at_crate_tiny_shapes(precision, device, peaky, fused):
    """B=2, N=197, d=384, K=6, p=64: soft (default init) and peaky (W_qkv × 4) attention."""
    problem = OfficialProblem(**CRATE_T_LAYER, seed=0, peaky=peaky)
    (result,) = layer_results(problem.state_dict(), problem.X, **_kwargs(problem, precision, fused, device))
    u = PRECISIONS[precision][2]
    _assert_rule(errors(result.fast_half, result.plain_half, result.ref_half, u), "MSSA")
    _assert_rule(errors(result.fast_out, result.plain_out, result.ref_out, u), "ISTA")


@pytest.mark.parametrize("precision, device", _crate_t_precisions())
@pytest.mark.parametrize("peaky", [False, True], ids=["soft", "peaky"])
@FUSED
def test_nonzero_count_differs_only_by_relu_flips(precision, device, peaky, fused):
    """|nnz_fast − nnz_ref| <= #{|pre_ref| <= τ}, τ = the rule's bound on the pre-activation error."""
    problem = OfficialProblem(**CRATE_T_LAYER, seed=0, peaky=peaky)
    (result,) = layer_results(problem.state_dict(), problem.X, **_kwargs(problem, precision, fused, device))
    tau = errors(result.plain_pre, result.plain_pre, result.ref_pre, PRECISIONS[precision][2]).bound
    allowance = int((result.ref_pre.abs() <= tau).sum())
    difference = abs(int((result.fast_out > 0).sum()) - int((result.ref_out > 0).sum()))
    print(f"non-zero count difference {difference}, allowance {allowance} (τ = {tau:.3e})")
    assert difference <= allowance


@pytest.mark.parametrize("precision", ["float32", "bf16-autocast"])
@pytest.mark.parametrize("device", DEVICES)
@FUSED
def test_fast_model_logits_follow_precision_rule(precision, device, fused):
    """The whole stack (errors compound with depth, math.md §8.3), against the plain whole model."""
    problem = OfficialProblem(batch=2, tokens=5, heads=4, head_dim=16, depth=4, seed=3, scale=1.0)
    dtype, _, u = PRECISIONS[precision]
    low = {key: value.to(dtype) for key, value in problem.state_dict().items()}
    ref_model = reference.OfficialCRATE.from_state_dict(low, heads=4, patch_size=2, channels=problem.channels)
    model = _fast(problem, low, dtype, fused, device)
    images = problem.images.to(dtype)
    device_state = {key: value.to(device) for key, value in low.items()}
    with torch.no_grad():
        expected = ref_model(images.double())
        with autocast(precision, device):
            fast = model(images.to(device)).cpu()
            baseline = plain.logits(device_state, images.to(device), 4, 2).cpu()
    _assert_rule(errors(fast, baseline, expected, u), "logits")


@pytest.mark.parametrize("precision", LOW_PRECISIONS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("peaky", [False, True], ids=["soft", "peaky"])
@FUSED
def test_fast_layer_gradients_follow_precision_rule(precision, device, peaky, fused):
    """∇ of ⟨layer output, g⟩ w.r.t. the input and every parameter of the layer, at CRATE-T shapes,
    with the reference's ReLU mask imposed on g (math.md §8.4)."""
    problem = OfficialProblem(**CRATE_T_LAYER, seed=0, peaky=peaky)
    results = layer_gradients(problem.state_dict(), problem.X, **_kwargs(problem, precision, fused, device))
    for name, result in results.items():
        _assert_rule(result, f"gradient of {name}")
