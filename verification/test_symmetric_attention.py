"""crate/models/attention.py's symmetric_attention, MSSA's training path on the CPU, and CUDA's fused SDPA
kernels, its training path on CUDA, against autograd of the explicit softmax(s·WWᵀ)·W.

float64: equal to autograd forward and backward (an identity: the symmetric backward is the chain
rule with the query and key gradients summed), and torch.autograd.gradcheck. Low precision: the
FlashAttention rule of docs/math.md §8, forward and backward, soft and peaky attention, against the
explicit path in the same precision. A negative control shows that the rule detects the cheaper
correction rowsum(dO ∘ O) that crate/models/attention.py explains it does not use. The low-precision
tests run at CRATE-T's head shapes, or --crate-model's (the negative control at CRATE-T's), on
--crate-device's device (verification/options.py).
"""

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from crate.models.attention import symmetric_attention
from verification import options
from verification.asserts import assert_close, max_abs
from verification.precision import CRATE_T_LAYER, PRECISIONS, autocast, errors
from verification.strategies import log_uniform, seeds
from verification.test_fast_model import DEVICES, LAYER, LOW_PRECISIONS


def explicit(w: torch.Tensor, scale: float) -> torch.Tensor:
    return ((w @ w.transpose(-2, -1)) * scale).softmax(dim=-1) @ w


def output_and_gradient(attention, w: torch.Tensor, scale: float, upstream: torch.Tensor):
    w = w.detach().requires_grad_()
    out = attention(w, scale)
    (grad,) = torch.autograd.grad(out, w, upstream.to(out.dtype))
    return out.detach(), grad


@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    tokens=st.integers(1, 9),
    head_dim=st.integers(1, 7),
    scale=log_uniform(1e-2, 3.0),
    magnitude=log_uniform(1e-2, 3.0),
    seed=seeds(),
)
@example(batch=1, heads=1, tokens=1, head_dim=1, scale=1.0, magnitude=1.0, seed=0)  # one token: P = 1
@example(batch=1, heads=1, tokens=9, head_dim=1, scale=3.0, magnitude=3.0, seed=0)  # peaky, N > p
def test_symmetric_attention_equals_autograd_in_float64(
    batch, heads, tokens, head_dim, scale, magnitude, seed
):
    """Identity. Tolerance 1e-10·(1 + max|reference|): float64 rounding (u ≈ 1.1e-16) amplified by about
    N·(1 + s·‖w‖²), which is 9·(1 + 3·7·9) ≈ 2e3 for a typical token at the largest s, p and magnitude
    (a few times that for the largest of 9), so 1e-10 leaves a margin of ~1e2."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, heads, tokens, head_dim)
    w = torch.randn(shape, generator=generator, dtype=torch.float64) * magnitude
    upstream = torch.randn(shape, generator=generator, dtype=torch.float64)
    out, grad = output_and_gradient(symmetric_attention, w, scale, upstream)
    ref_out, ref_grad = output_and_gradient(explicit, w, scale, upstream)
    assert_close(out, ref_out, 1e-10 * (1 + max_abs(ref_out)), "output")
    assert_close(grad, ref_grad, 1e-10 * (1 + max_abs(ref_grad)), "gradient")


def test_symmetric_attention_passes_gradcheck():
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(2, 2, 5, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: symmetric_attention(w, 0.7), (w,))


def head_tokens(
    layer: dict, peaky: bool, device: str, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Head tokens at a layer's shapes (CRATE-T's: B=2, K=6, N=197, p=64, d = 384): W = LN(Z)·U with the
    released init's U ~ U(±1/√d), so entries have variance 1/3 (soft); peaky: U × 4 as the suite's
    OfficialProblem. Returns W, an upstream gradient, and the scale p^{-½}."""
    batch, tokens, heads, head_dim = (layer[key] for key in ("batch", "tokens", "heads", "head_dim"))
    dim = heads * head_dim
    generator = torch.Generator().manual_seed(seed)
    y = torch.randn(batch, tokens, dim, generator=generator, dtype=torch.float64)
    u = (torch.rand(dim, dim, generator=generator, dtype=torch.float64) * 2 - 1) / math.sqrt(dim)
    w = (y @ (4 * u if peaky else u)).reshape(batch, tokens, heads, head_dim).transpose(1, 2)
    upstream = torch.randn(w.shape, generator=generator, dtype=torch.float64)
    return w.to(device), upstream.to(device), head_dim**-0.5


def rule_errors(attention, precision: str, peaky: bool, device: str, layer: dict = LAYER):
    """(forward, backward) Errors of ``attention`` against float64 on the same rounded inputs, with
    the explicit path in the same precision as the plain baseline, at ``layer``'s head shapes."""
    dtype, _, u = PRECISIONS[precision]
    w, upstream, scale = head_tokens(layer, peaky, device)
    w, upstream = w.to(dtype), upstream.to(dtype)
    ref_out, ref_grad = output_and_gradient(explicit, w.double(), scale, upstream.double())
    with autocast(precision, device):
        out, grad = output_and_gradient(attention, w, scale, upstream)
        plain_out, plain_grad = output_and_gradient(explicit, w, scale, upstream)
    return errors(out, plain_out, ref_out, u), errors(grad, plain_grad, ref_grad, u)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", LOW_PRECISIONS)
@pytest.mark.parametrize("peaky", [False, True], ids=["soft", "peaky"])
def test_symmetric_attention_follows_precision_rule(precision, peaky, device):
    forward, backward = rule_errors(symmetric_attention, precision, peaky, device)
    print(f"{precision} {'peaky' if peaky else 'soft'} forward: {forward}; backward: {backward}")
    assert forward.holds, f"forward: {forward}"
    assert backward.holds, f"backward: {backward}"


class OutputCorrection(torch.autograd.Function):
    """The symmetric backward with the softmax correction taken as rowsum(dO ∘ O): equal in exact
    arithmetic, cheaper (a sum over p), and not used by crate/models/attention.py."""

    @staticmethod
    def forward(ctx, w, scale):
        p = ((w @ w.transpose(-2, -1)).float() * scale).softmax(dim=-1).to(w.dtype)
        o = p @ w
        ctx.save_for_backward(w, p, o)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        w, p, o = ctx.saved_tensors
        correction = (do.float() * o.float()).sum(-1, keepdim=True)
        ds = ((do @ w.transpose(-2, -1)).float() - correction) * p.float()
        return p.transpose(-2, -1) @ do + (ds + ds.transpose(-2, -1)).to(w.dtype) @ (w * ctx.scale), None


def test_precision_rule_detects_the_output_correction():
    """Negative control: with peaky bf16 attention the correction from the rounded O loses the
    cancellation dP_ii − rowsum that P ∘ (dP − rowsum(dP ∘ P)) keeps (measured here 15.6× the plain
    error, the rule's bound 2×). At CRATE-T's shapes, where that was measured, whatever --crate-model."""
    _, backward = rule_errors(
        OutputCorrection.apply, "bfloat16", peaky=True, device="cpu", layer=CRATE_T_LAYER
    )
    print(backward)
    assert not backward.holds, f"the rule no longer detects the cheaper correction: {backward}"


def saved_bytes(attention, w: torch.Tensor) -> int:
    """Bytes that autograd keeps for the backward of attention(w), each storage counted once."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        attention(w.detach().requires_grad_())
    return sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_symmetric_attention_saves_only_w_and_p(dtype):
    """Exact: W (B, K, N, p) and P (B, K, N, N) in W's dtype, less than the explicit path keeps."""
    w = torch.randn(2, 3, 17, 8, dtype=dtype)
    expected = (w.numel() + 2 * 3 * 17 * 17) * w.element_size()
    fast = saved_bytes(lambda w: symmetric_attention(w, 0.125), w)
    assert fast == expected
    assert fast <= saved_bytes(lambda w: explicit(w, 0.125), w)


CUDA_ONLY = options.needs_cuda()
SDPA_BACKENDS = {
    "cudnn": torch.nn.attention.SDPBackend.CUDNN_ATTENTION,
    "flash": torch.nn.attention.SDPBackend.FLASH_ATTENTION,
    "memory-efficient": torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION,
    "math": torch.nn.attention.SDPBackend.MATH,  # the baseline: PyTorch's explicit composite
}
HALF_ONLY = ("cudnn", "flash")  # no float32 kernel
# the head shapes of CRATE-T, -S and -B at 224² with 16² patches: 197 tokens, 6×64, 12×48, 12×64
SIZES = {size: options.layer_shapes(f"crate_{size}_patch16_224") for size in ("tiny", "small", "base")}


def sdpa(backend: str):
    def attention(w: torch.Tensor, scale: float) -> torch.Tensor:
        with torch.nn.attention.sdpa_kernel(SDPA_BACKENDS[backend]):
            return torch.nn.functional.scaled_dot_product_attention(w, w, w, scale=scale)

    return attention


def sdpa_rule_errors(backend: str, precision: str, peaky: bool, layer: dict):
    """rule_errors of one pinned SDPA backend on CUDA; pytest.skip naming the backend and the shapes
    where it has no kernel for them (PyTorch raises "No available kernel")."""
    try:
        return rule_errors(sdpa(backend), precision, peaky, "cuda", layer)
    except RuntimeError as error:
        if "No available kernel" not in str(error):
            raise
        pytest.skip(f"SDPA {backend} has no kernel for {precision} at {layer}: {str(error).splitlines()[0]}")


@CUDA_ONLY
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("backend", list(SDPA_BACKENDS))
@pytest.mark.parametrize("precision", ["float32", "bfloat16", "float16", "bf16-autocast"])
@pytest.mark.parametrize("peaky", [False, True], ids=["soft", "peaky"])
def test_cuda_sdpa_follows_precision_rule(backend, precision, peaky, size):
    """Each of CUDA's SDPA backends pinned (sdpa_kernel) against the explicit path at N = 197 and the
    head shapes of CRATE-T, -S and -B: forward (the fast model's inference path) and, in half
    precision, backward (its training path there; crate/train's --sdpa-backend pins one for a run).
    cuDNN and flash attention have no float32 kernel; the memory-efficient kernel's float32 backward
    is not used for training (crate.models.layers.MSSA): it erred 6.0× (soft) and 17× (peaky) the
    plain error (H100, torch 2.11), so float32 backwards are only printed."""
    if backend in HALF_ONLY and precision == "float32":
        pytest.skip(f"{backend} attention runs in float16 and bfloat16 only")
    forward, backward = sdpa_rule_errors(backend, precision, peaky, SIZES[size])
    weights = "peaky" if peaky else "soft"
    print(f"SDPA {backend} {size} {precision} {weights} forward: {forward}; backward: {backward}")
    assert forward.holds, f"forward: {forward}"
    if precision != "float32":
        assert backward.holds, f"backward: {backward}"
