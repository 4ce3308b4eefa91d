"""The fast models equal their float64 references, layer by layer and whole, forward and backward, in
every precision they support (docs/math.md §8; rows 27 and 28): crate/models/model.py against
reference.OfficialCRATE (test ids ``crate``), and crate/models/alpha.py against reference.OfficialCRATEAlpha
(ids ``alpha``; docs/crate-alpha.md §3). Each property is written once for both families; the
``Subject`` of a family says how to draw its problems and which of its tensors are compared.

float64: max|fast − ref| <= 1e-10·(1 + max|ref|) (measured ~3e-15 for CRATE, ≤ 4e-15 for CRATE-α).
Low precision: the FlashAttention rule of verification/precision.py, with crate/verify/plain.py
(explicit softmax, three-matmul ISTA) or crate/verify/plain_alpha.py (the released ODL code, explicit
softmax) as the plain implementation. Each precision runs with fused (SDPA) and explicit attention;
CUDA cases (TF32 off and on) run where a GPU is present and are skipped otherwise. ``--crate-device``
and ``--crate-model`` (verification/options.py) choose the device, and the layer shapes and family of
the CRATE-T layer tests.

The low-precision backward (docs/math.md §8.4): CRATE's layer output is its codes, so the reference's ReLU
mask is imposed on the upstream gradient g entry by entry. CRATE-α's layer output z + a₂D₁ᵀ is dense,
so the ReLU flips of a₁ and a₂ cannot be masked on the output entry by entry. Instead g is zeroed on
every token where fast, plain or reference disagree on the side of any code of either ReLU: the block
acts on tokens independently, so g = 0 on a token's output removes that token's discontinuity from
every gradient, and what remains is a continuous function of the inputs, to which the rule applies.
Measured at the CRATE-α layer shapes (seed 0, of 394 tokens; `python -m verification.precision
--family alpha`): float32 393–394 tokens survive, float16 251–285, bfloat16 15–37 and bf16 autocast
9–47 on CPU (peaky, seeds 0–5: bfloat16 12–21, autocast 7–10); on an H100 float32 394, TF32 271–300,
float16 253–284, bfloat16 15–33, autocast 11–49. Each token has 2·4d = 3072 ReLUs, and in bf16 about
one pre-activation in a thousand lies within the rounding error of zero. So few survive in bf16, but
the check stays sound and is not vacuous: the gradient w.r.t. the input still reaches all 394 tokens
through the attention, every parameter's gradient gets the surviving tokens' contributions through
every code path (a detached a₁ or D₁ in the fast model fails every precision, bf16 included), and the
test requires at least one token (for CRATE: one entry). Loosening the rule's constants, or comparing
norm-wise over flipped tokens, would not be sound.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import reference
from crate import convert_official_state_dict
from crate.models.model import ista_matrix, ista_step
from crate.verify import gate, plain, plain_alpha
from verification import options
from verification.asserts import assert_close, assert_within, max_abs
from verification.precision import (
    ALPHA_FAMILY,
    CRATE_FAMILY,
    PRECISIONS,
    Family,
    LayerResult,
    autocast,
    errors,
    fast_model,
    layer_gradient_check,
    layer_results,
    problem_kwargs,
)
from verification.strategies import (
    OfficialAlphaProblem,
    OfficialProblem,
    log_uniform,
    official_alpha_problems,
    official_problems,
    scaled_settings,
    seeds,
)

DEVICES = [options.on_device(device, device) for device in options.devices()]
LAYER = options.layer_shapes()  # CRATE-T's, or --crate-model's
LOW_PRECISIONS = ["float32", "bfloat16", "float16", "bf16-autocast"]
FUSED = pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
PEAKY = pytest.mark.parametrize("peaky", [False, True], ids=["soft", "peaky"])


@dataclass(frozen=True)
class Subject:
    """A model family under test: its Family (verification/precision.py), its problems (a class with
    the fields of OfficialProblem, and the hypothesis strategy that draws them), the name of its
    sparse coding block, whether its codes a₂ are compared besides the layer output (CRATE's codes
    are its output), and its plain logits ``(state, images, heads, patch_size)``."""

    family: Family
    problem: type[OfficialProblem]
    problems: Callable[..., st.SearchStrategy[OfficialProblem]]
    sparse_coding: str
    separate_codes: bool
    plain_logits: Callable[..., torch.Tensor]


CRATE = Subject(
    family=CRATE_FAMILY,
    problem=OfficialProblem,
    problems=official_problems,
    sparse_coding="ISTA",
    separate_codes=False,
    plain_logits=plain.logits,
)
ALPHA = Subject(
    family=ALPHA_FAMILY,
    problem=OfficialAlphaProblem,
    problems=official_alpha_problems,  # dictionaries of 1 to 4 times d atoms
    sparse_coding="ODL",
    separate_codes=True,
    plain_logits=lambda state, images, heads, patch_size: plain_alpha.logits(state, images, heads),
)
SUBJECTS = pytest.mark.parametrize("subject", [CRATE, ALPHA], ids=["crate", "alpha"])
LAYER_SUBJECTS = pytest.mark.parametrize(
    "subject",
    [pytest.param(s, id=s.family.name) for s in (CRATE, ALPHA) if options.family() in (None, s.family.name)],
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread for this module. Its shapes are small (hypothesis) or one layer, and on a
    loaded 2-core machine two OpenMP threads spin-wait on each other: the CI profile of the CRATE-α
    cases took 3.5 min with two threads and 34 s with one (the float64 layer test alone 74 s vs 4 s),
    and of the CRATE cases 350 s with two threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _float64_tolerance(ref: torch.Tensor) -> float:
    return 1e-10 * (1 + ref.abs().max().item())


def _assert_rule(result, what: str) -> None:
    __tracebackhide__ = True
    print(f"{what}: {result}")
    assert_within(result.fast, result.bound, f"{what}: fast error vs 2·plain + 4u(1 + max|ref|) [{result}]")


def _compared(subject: Subject, result: LayerResult) -> list[tuple]:
    """(name, fast, plain, reference) of each tensor of a layer that is compared: z_half (after MSSA),
    the layer output and, for CRATE-α, the codes a₂."""
    compared = [
        ("MSSA", result.fast_half, result.plain_half, result.ref_half),
        (subject.sparse_coding, result.fast_out, result.plain_out, result.ref_out),
    ]
    if subject.separate_codes:
        compared.append(("codes a2", result.fast_codes, result.plain_codes, result.ref_codes))
    return compared


# float64: the algebra ---------------------------------------------------------------------------
@SUBJECTS
@FUSED
@scaled_settings(0.3)
@given(st.data())
def test_fast_layers_equal_reference_in_float64(subject, fused, data):
    """Every layer's MSSA (z_half) and ISTA or ODL output (CRATE-α: and codes a₂), each layer fed the
    reference's input; hypothesis shapes with odd sizes, one head of full width, soft and peaky."""
    problem = data.draw(subject.problems(peaky=True))
    kwargs = problem_kwargs(problem, subject.family, fused, precision="float64")
    for layer, result in enumerate(layer_results(problem.state_dict(), problem.X, **kwargs)):
        for name, fast, _, ref in _compared(subject, result):
            assert_close(fast, ref, _float64_tolerance(ref), f"layer {layer} {name}")


@SUBJECTS
@FUSED
@scaled_settings(0.3)
@given(st.data())
def test_fast_model_equals_reference_in_float64(subject, fused, data):
    """Logits and every forward_intermediates state, from an official (released) state dict converted."""
    problem = data.draw(subject.problems(peaky=True))
    state = problem.state_dict()
    ref_model = problem.model()
    model = fast_model(state, **problem_kwargs(problem, subject.family, fused, dtype=torch.float64))
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


@SUBJECTS
@FUSED
@scaled_settings(0.2)
@given(st.data())
def test_fast_model_gradients_equal_reference_in_float64(subject, fused, data):
    """∇ of ⟨logits, g⟩ w.r.t. the images and every parameter, matched by official (released) name."""
    problem = data.draw(subject.problems(peaky=True, max_depth=2))
    state = problem.state_dict()
    ref_model = problem.model()
    model = fast_model(state, **problem_kwargs(problem, subject.family, fused, dtype=torch.float64))
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
@SUBJECTS
@pytest.mark.parametrize("precision", LOW_PRECISIONS)
@FUSED
@scaled_settings(0.1)
@given(st.data())
def test_fast_layers_follow_precision_rule(subject, precision, fused, data):
    problem = data.draw(subject.problems(peaky=True, max_head_dim=8))
    u = PRECISIONS[precision][2]
    kwargs = problem_kwargs(problem, subject.family, fused, precision=precision)
    for layer, result in enumerate(layer_results(problem.state_dict(), problem.X, **kwargs)):
        for name, fast, plain_result, ref in _compared(subject, result):
            _assert_rule(errors(fast, plain_result, ref, u), f"layer {layer} {name}")


def _crate_t_precisions():
    """(precision, device) of the CRATE-T layer tests: TF32 is CUDA's only."""
    cuda_precisions = [*LOW_PRECISIONS, "tf32"]
    return [
        options.on_device(device, precision, device)
        for device in options.devices()
        for precision in (cuda_precisions if device == "cuda" else LOW_PRECISIONS)
    ]


@functools.cache
def _crate_t_layer(subject: Subject, precision: str, device: str, peaky: bool, fused: bool) -> LayerResult:
    """The LayerResult at CRATE-T's (or --crate-model's) layer shapes, shared by the rule and the
    non-zero-count tests."""
    problem = subject.problem(**LAYER, seed=0, peaky=peaky)
    (result,) = layer_results(
        problem.state_dict(),
        problem.X,
        **problem_kwargs(problem, subject.family, fused, device, precision=precision),
    )
    return result


@LAYER_SUBJECTS
@pytest.mark.parametrize("precision, device", _crate_t_precisions())
@PEAKY
@FUSED
def test_fast_layer_follows_precision_rule_at_crate_tiny_shapes(subject, precision, device, peaky, fused):
    """B=2, N=197, d=384, K=6, p=64 (CRATE-α: m=1536), or --crate-model's layer: soft (default,
    released init) and peaky (W_qkv × 4) attention."""
    result = _crate_t_layer(subject, precision, device, peaky, fused)
    u = PRECISIONS[precision][2]
    for name, fast, plain_result, ref in _compared(subject, result):
        _assert_rule(errors(fast, plain_result, ref, u), name)


@given(
    batch=st.integers(1, 2),
    tokens=st.integers(1, 9),
    dim=st.integers(1, 9),
    eta=log_uniform(1e-3, 1.0),
    lam=st.floats(0.0, 1.0),
    seed=seeds(),
)
@example(batch=1, tokens=4, dim=5, eta=0.1, lam=0.1, seed=0)  # 4 tokens < d: (u − uWᵀ)·ηW
@example(batch=1, tokens=5, dim=5, eta=0.1, lam=0.1, seed=0)  # d tokens: u·M
def test_ista_step_equals_released_block_in_float64_with_fewer_or_more_tokens_than_width(
    batch, tokens, dim, eta, lam, seed
):
    """Identity, both forms of crate.models.model.ista_step against the released three-product block: the form
    turns on the call's token count (batch·tokens against d). Tolerance 1e-12(1 + max|u|)(1 + η‖W‖²)
    bounds the rounding of either form's sums (‖W‖ ≤ 3 here); measured worst error 1.9e-4 of it in
    either form over 3000 draws of these ranges."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, tokens, dim, generator=generator, dtype=torch.float64)
    W = torch.randn(dim, dim, generator=generator, dtype=torch.float64) / dim**0.5
    released = reference.official.ISTA(dim, eta=eta, lam=lam).double()
    with torch.no_grad():
        released.weight.copy_(W)
        expected = released(u)
        fast = ista_step(u, W, eta, lam)
    tolerance = 1e-12 * (1 + max_abs(u)) * (1 + eta * torch.linalg.matrix_norm(W, ord=2).item() ** 2)
    assert_close(fast, expected, tolerance, f"ISTA with {batch * tokens} tokens, d = {dim}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ista_matrix_is_rounded_once(dtype):
    """Bounded: M = η(W − WᵀW) is within one rounding of its exact value, |M − M*| ≤ u·|M*| entrywise
    plus half the subnormal spacing (M* in float64, whose own error is ~1e-16 relative), at the
    released init's scale U(±√(6/d)), d = 64. Every token's u·M shares M's rounding, so its error adds
    coherently in a gradient summed over tokens (ista_matrix); computed in float32 itself, M erred up
    to 2516u (median 1.7u)."""
    W, exact = _ista_weight(dtype)
    M = ista_matrix(W, 0.1)
    assert M.dtype == dtype
    finfo = torch.finfo(dtype)
    underflow = finfo.smallest_normal * finfo.eps / 2  # half the subnormal spacing (float16's |M*| ≥ 1e-5)
    assert torch.all((M.double() - exact).abs() <= finfo.eps / 2 * exact.abs() + underflow)


def test_ista_matrix_under_autocast_is_float32_out_of_autocast():
    """Bounded: under bf16 autocast, M is float32 computed with autocast off, so that the product u·M
    rounds it once, to bf16: |M − M*| ≤ u_bf16/4·|M*| (measured at most 0.04 u_bf16). Computed
    under autocast, WᵀW would be a bf16 product, rounded before the difference (~10 u_bf16·|M|)."""
    W, exact = _ista_weight(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        M = ista_matrix(W, 0.1)
    assert M.dtype == torch.float32
    assert torch.all((M.double() - exact).abs() <= torch.finfo(torch.bfloat16).eps / 8 * exact.abs())


def _ista_weight(dtype: torch.dtype, d: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """W at the released init's scale in ``dtype``, and η(W − WᵀW) of it in float64 (η = 0.1)."""
    uniform = torch.rand(d, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    W = ((uniform * 2 - 1) * (6 / d) ** 0.5).to(dtype)
    return W, 0.1 * (W.double() - W.double().T @ W.double())


@pytest.mark.skipif(options.family() == ALPHA_FAMILY.name, reason="--crate-model is a CRATE-α model")
@pytest.mark.skipif(
    LAYER["tokens"] >= LAYER["heads"] * LAYER["head_dim"], reason="--crate-model's layer has N >= d tokens"
)
@pytest.mark.parametrize("precision", LOW_PRECISIONS)
@PEAKY
def test_fast_layer_with_fewer_tokens_than_width_follows_precision_rule(precision, peaky):
    """CRATE-T's (or --crate-model's) layer at batch 1 (197 tokens < d = 384: ISTA's (u − uWᵀ)·ηW
    form), forward and the gradients of every parameter and the input, as the batch-2 tests above."""
    problem = CRATE.problem(**(LAYER | dict(batch=1)), seed=0, peaky=peaky)
    kwargs = problem_kwargs(problem, CRATE.family, True, "cpu", precision=precision)
    (result,) = layer_results(problem.state_dict(), problem.X, **kwargs)
    u = PRECISIONS[precision][2]
    for name, fast, plain_result, ref in _compared(CRATE, result):
        _assert_rule(errors(fast, plain_result, ref, u), name)
    for name, gradient in layer_gradient_check(problem.state_dict(), problem.X, **kwargs).errors.items():
        _assert_rule(gradient, f"gradient of {name}")


@LAYER_SUBJECTS
@pytest.mark.parametrize("precision, device", _crate_t_precisions())
@PEAKY
@FUSED
def test_nonzero_count_differs_only_by_relu_flips(subject, precision, device, peaky, fused):
    """Codes (CRATE: the ISTA output; CRATE-α: a₂ = block.odl.codes(block.norm2(z_half))[1]):
    |nnz_fast − nnz_ref| <= #{|pre_ref| <= τ}, τ = the rule's bound on the error of the (last)
    pre-activation (plain's, against the reference)."""
    result = _crate_t_layer(subject, precision, device, peaky, fused)
    tau = errors(result.plain_pre, result.plain_pre, result.ref_pre, PRECISIONS[precision][2]).bound
    allowance = int((result.ref_pre.abs() <= tau).sum())
    difference = abs(int((result.fast_codes > 0).sum()) - int((result.ref_codes > 0).sum()))
    print(f"non-zero count difference {difference}, allowance {allowance} (τ = {tau:.3e})")
    assert difference <= allowance


@SUBJECTS
@pytest.mark.parametrize("precision", ["float32", "bf16-autocast"])
@pytest.mark.parametrize("device", DEVICES)
@FUSED
def test_fast_model_logits_follow_precision_rule(subject, precision, device, fused):
    """The whole stack, depth 4 (errors compound with depth, docs/math.md §8.3), against the plain model."""
    problem = subject.problem(batch=2, tokens=5, heads=4, head_dim=16, depth=4, seed=3, scale=1.0)
    dtype, _, u = PRECISIONS[precision]
    low = {key: value.to(dtype) for key, value in problem.state_dict().items()}
    model = fast_model(low, **problem_kwargs(problem, subject.family, fused, device, dtype=dtype))
    ref_model = subject.family.make_reference(
        {key: value.double() for key, value in low.items()}, model.config
    )
    images = problem.images.to(dtype)
    device_state = {key: value.to(device) for key, value in low.items()}
    with torch.no_grad():
        expected = ref_model(images.double())
        with autocast(precision, device):
            fast = model(images.to(device)).cpu()
            baseline = subject.plain_logits(device_state, images.to(device), 4, problem.patch_size).cpu()
    _assert_rule(errors(fast, baseline, expected, u), "logits")


@LAYER_SUBJECTS
@pytest.mark.parametrize("precision", LOW_PRECISIONS)
@pytest.mark.parametrize("device", DEVICES)
@PEAKY
@FUSED
def test_fast_layer_gradients_follow_precision_rule(subject, precision, device, peaky, fused):
    """∇ of ⟨layer output, g⟩ w.r.t. the input and every parameter of the layer, at CRATE-T's layer
    shapes (CRATE-α: m = 4d) or --crate-model's, g zeroed where fast, plain or reference put a code on
    another side of its ReLU: entry-wise for CRATE (the reference's ReLU mask, docs/math.md §8.4), on
    every token with such a code of a₁ or a₂ for CRATE-α (module docstring); at least one entry or token
    must keep its g."""

    def gradients(batch: int):
        problem = subject.problem(**LAYER | dict(batch=batch), seed=0, peaky=peaky)
        kwargs = problem_kwargs(problem, subject.family, fused, device, precision=precision)
        return layer_gradient_check(problem.state_dict(), problem.X, **kwargs)

    check = gradients(LAYER["batch"])
    if check.kept < gate.MIN_KEPT:  # as the gate does: WIDER times the images (CRATE-α-B's width)
        check = gradients(gate.WIDER * LAYER["batch"])
    kept = "tokens" if subject.family.token_mask else "entries"
    print(f"{kept} with a non-zero upstream gradient: {check.kept} of {check.total}")
    assert check.kept >= 1, f"every one of the {kept} has a ReLU flip: the backward is not tested"
    for name, result in check.errors.items():
        _assert_rule(result, f"gradient of {name}")
