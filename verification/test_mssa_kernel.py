"""crate/models/mssa_kernel.py's fused Triton kernels for MSSA's attention, against autograd of the
explicit softmax(s·WWᵀ)·W, as test_symmetric_attention.py checks symmetric_attention.

float64: equal to autograd forward and backward (an identity), and torch.autograd.gradcheck. Low
precision: the precision rule of docs/math.md §8, forward and backward, soft and peaky attention,
at CRATE-T's head shapes (or --crate-model's), against the explicit path in the same precision.

Where the kernels run: on CUDA, compiled; without CUDA the root conftest.py sets TRITON_INTERPRET=1
(before anything imports Triton, which reads it then), and the "cpu" cases run them under Triton's
interpreter, which executes each program in numpy: a tl.dot of bf16 or fp16 blocks multiplies the
values of those blocks (exactly representable in float32) with float32 accumulation (np.matmul with
dtype float32), exp and log in float32. So on the CPU the rule checks the algorithm and where it
rounds (which operands are rounded to W's dtype, what is accumulated in float32, where Δ comes
from), not the GPU's tensor cores and their accumulation order, which the "cuda" cases check
(`-k cuda`, benchmarks/run_gpu.sh). On a CUDA machine the interpreter is off and the cpu cases skip.
"""

import contextlib
import functools
import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from crate.models import layers
from verification import options
from verification.asserts import assert_close, max_abs
from verification.strategies import log_uniform, scaled_settings, seeds
from verification.test_symmetric_attention import explicit, output_and_gradient, rule_errors

triton = pytest.importorskip("triton")
mssa_kernel = pytest.importorskip("crate.models.mssa_kernel")
fused_symmetric_attention = mssa_kernel.fused_symmetric_attention
TILING = pytest.mark.parametrize("tiling", mssa_kernel.TILINGS)

INTERPRETED = triton.knobs.runtime.interpret


def _device(device: str):
    if device == "cpu":
        skip = pytest.mark.skipif(not INTERPRETED, reason="CUDA compiles the kernels: no interpreter for cpu")
        return pytest.param(device, marks=skip)
    compiled = pytest.mark.skipif(INTERPRETED, reason="TRITON_INTERPRET is set: the kernels are interpreted")
    return pytest.param(device, marks=[options.needs_cuda(), compiled])


DEVICES = [_device(device) for device in options.devices()]


@pytest.fixture(autouse=True)
def one_blas_thread():
    """The interpreter's dots are numpy's small matmuls; OpenBLAS threads contending with PyTorch's
    made them 3× slower on 2 cores (one CRATE-T forward and backward 5.9 s, 1.9 s with one thread)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        limits = contextlib.nullcontext()
    else:
        limits = threadpool_limits(1, user_api="blas") if INTERPRETED else contextlib.nullcontext()
    with limits:
        yield


PRECISIONS_LOW = ["bfloat16", "float16", "bf16-autocast", "float32"]
SLOW_ON_CPU = ("float16", "bf16-autocast") if INTERPRETED else ()  # for the triangle tiling


@TILING
@pytest.mark.parametrize("device", DEVICES)
@scaled_settings(0.1)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    tokens=st.integers(1, 40),
    head_dim=st.integers(1, 20),
    scale=log_uniform(1e-2, 3.0),
    magnitude=log_uniform(1e-2, 3.0),
    seed=seeds(),
)
@example(batch=1, heads=1, tokens=1, head_dim=1, scale=1.0, magnitude=1.0, seed=0)  # one token: P = 1
@example(batch=1, heads=1, tokens=9, head_dim=1, scale=3.0, magnitude=3.0, seed=0)  # peaky, N > p
@example(batch=1, heads=2, tokens=65, head_dim=17, scale=0.5, magnitude=1.0, seed=0)  # 2 row blocks, p > 16
@example(batch=2, heads=1, tokens=16, head_dim=16, scale=0.25, magnitude=1.0, seed=1)  # no padding
@example(batch=2, heads=3, tokens=40, head_dim=20, scale=3.0, magnitude=3.0, seed=0)  # P normalised?
def test_fused_attention_equals_autograd_in_float64(
    tiling, device, batch, heads, tokens, head_dim, scale, magnitude, seed
):
    """Identity. Tolerance 1e-10·(1 + max|reference|) as test_symmetric_attention.py's: float64 rounding
    (u ≈ 1.1e-16) amplified by about N·(1 + s·‖w‖²), at most 40·(1 + 3·9·20) ≈ 2e4 for a typical token
    at the largest N, s, p and magnitude, so 1e-10 leaves a margin of ~50. Tokens past one row block
    (64) and head dimensions past 16 are among the examples, so padding and the row-block loop are."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, heads, tokens, head_dim)
    w = (torch.randn(shape, generator=generator, dtype=torch.float64) * magnitude).to(device)
    upstream = torch.randn(shape, generator=generator, dtype=torch.float64).to(device)
    kernel = functools.partial(fused_symmetric_attention, tiling=tiling)
    out, grad = output_and_gradient(kernel, w, scale, upstream)
    ref_out, ref_grad = output_and_gradient(explicit, w, scale, upstream)
    assert_close(out, ref_out, 1e-10 * (1 + max_abs(ref_out)), "output")
    assert_close(grad, ref_grad, 1e-10 * (1 + max_abs(ref_grad)), "gradient")


@TILING
@pytest.mark.parametrize("device", DEVICES)
def test_fused_attention_passes_gradcheck(tiling, device):
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(1, 2, 5, 3, generator=generator, dtype=torch.float64).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda w: fused_symmetric_attention(w, 0.7, tiling), (w,))


@pytest.mark.parametrize(
    "tiling, precision",
    [("rows", precision) for precision in PRECISIONS_LOW]
    + [
        pytest.param("triangle", precision, marks=[pytest.mark.slow] if precision in SLOW_ON_CPU else [])
        for precision in PRECISIONS_LOW
    ],
)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("peaky", [False, True], ids=["soft", "peaky"])
def test_fused_attention_follows_precision_rule(precision, peaky, device, tiling):
    """At CRATE-T's head shapes (B 2, K 6, N 197, p 64; four row blocks, padded to 256 keys; the
    triangle's 10 tiles), soft (released init) and peaky (U × 4); the triangle's fp16 and bf16
    autocast cases are slow on the CPU (the default run keeps the added time under a minute).
    float32 on the CPU checks the algorithm only (the interpreter's float32 dot is numpy's); on CUDA
    the kernel's float32 dot is IEEE, not TF32."""
    kernel = functools.partial(fused_symmetric_attention, tiling=tiling)
    forward, backward = rule_errors(kernel, precision, peaky, device)
    weights = "peaky" if peaky else "soft"
    print(f"kernel ({tiling}) {precision} {weights} forward: {forward}; backward: {backward}")
    assert forward.holds, f"forward: {forward}"
    assert backward.holds, f"backward: {backward}"


OTHER_ROWS = [rows for rows in mssa_kernel.CANDIDATE_ROWS if rows != mssa_kernel.TILES.forward_rows]
SLOW_TILES = {("triangle", 16)} if INTERPRETED else set()  # 91 tiles a head interpreted: 27 s on 2 cores


@pytest.mark.parametrize(
    "tiling, rows",
    [
        pytest.param(tiling, rows, marks=[pytest.mark.slow] if (tiling, rows) in SLOW_TILES else [])
        for tiling in mssa_kernel.TILINGS
        for rows in OTHER_ROWS
    ],
)
@pytest.mark.parametrize("device", [_device("cpu")])
def test_every_candidate_tile_computes_the_same_function(rows, tiling, device):
    """The tile sweep's other row blocks (benchmarks/test_attention_kernel.py chooses among them on a
    GPU): float64 equal to autograd as above (N 40: 3 or 2 row blocks, the last padded), and bf16 under
    the precision rule, soft and peaky, at CRATE-T's head shapes (the triangle's 16-row tiles slow on
    the CPU). Interpreted only: on CUDA the sweep checks the rule for every launch shape it times,
    warps included (they change no interpreted value)."""
    tiles = mssa_kernel.Tiles(forward_rows=rows, backward_rows=rows)
    kernel = functools.partial(fused_symmetric_attention, tiling=tiling, tiles=tiles)
    generator = torch.Generator().manual_seed(0)
    w = (torch.randn(2, 3, 40, 20, generator=generator, dtype=torch.float64) * 3).to(device)
    upstream = torch.randn(w.shape, generator=generator, dtype=torch.float64).to(device)
    out, grad = output_and_gradient(kernel, w, 3.0, upstream)
    ref_out, ref_grad = output_and_gradient(explicit, w, 3.0, upstream)
    assert_close(out, ref_out, 1e-10 * (1 + max_abs(ref_out)), "output")
    assert_close(grad, ref_grad, 1e-10 * (1 + max_abs(ref_grad)), "gradient")
    for peaky in (False, True):
        forward, backward = rule_errors(kernel, "bfloat16", peaky, device)
        print(f"kernel ({tiling}, {rows} rows) bf16 peaky {peaky} forward: {forward}; backward: {backward}")
        assert forward.holds and backward.holds, f"peaky {peaky}: forward {forward}; backward {backward}"


def test_a_launch_shape_the_kernels_cannot_take_is_refused():
    with pytest.raises(ValueError, match=r"forward_rows 48; expected one of \(16, 32, 64, 128\)"):
        mssa_kernel.Tiles(forward_rows=48)
    with pytest.raises(ValueError, match=r"backward_warps 3; expected one of \(1, 2, 4, 8, 16\)"):
        mssa_kernel.Tiles(backward_warps=3)


@TILING
@pytest.mark.parametrize("device", DEVICES)
def test_fused_attention_saves_only_w(device, tiling):
    """Exact: autograd keeps W (B, K, N, p) in its dtype alone (the scale is a number on the node), no
    N×N matrix and no statistics of the rows (the backward recomputes the softmax from S)."""
    w = torch.randn(2, 3, 17, 8, dtype=torch.bfloat16, device=device)
    stored = []

    def pack(tensor):
        stored.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fused_symmetric_attention(w.requires_grad_(), 0.125, tiling)
    assert stored == [((2, 3, 17, 8), torch.bfloat16)]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("device", DEVICES)
def test_the_kernels_compile_into_one_graph(device, backend):
    """Exact: torch.compile traces through the kernels with no graph break (fullgraph=True; they are
    two operators, crate::symmetric_attention_forward and _backward, the second the first's
    gradient), and the compiled forward and gradient are the eager ones bit for bit (the same kernel
    launches; nothing around them to fuse). aot_eager traces and runs the graphs as they are;
    inductor is the compiled training step's backend (~5 s on 2 cores)."""
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(2, 3, 40, 20, generator=generator).to(device).requires_grad_()
    upstream = torch.randn(w.shape, generator=generator).to(device)
    out, grad = output_and_gradient(fused_symmetric_attention, w, 0.3, upstream)
    torch._dynamo.reset()
    compiled = torch.compile(fused_symmetric_attention, backend=backend, fullgraph=True)
    compiled_out, compiled_grad = output_and_gradient(compiled, w, 0.3, upstream)
    assert torch.equal(compiled_out, out) and torch.equal(compiled_grad, grad)


@pytest.mark.parametrize("device", DEVICES)
def test_the_kernel_operators_pass_opcheck(device):
    """torch.library.opcheck on both operators in float64: the schema (no input mutated), the
    registered gradient, the fake (meta) implementations torch.compile traces with, and AOTAutograd's
    dispatch with dynamic shapes."""
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(1, 2, 20, 8, generator=generator, dtype=torch.float64).to(device)
    upstream = torch.randn(w.shape, generator=generator, dtype=torch.float64).to(device)
    torch.library.opcheck(mssa_kernel._forward, (w.requires_grad_(), 0.3, "rows", 64, 4, 64, 4))
    torch.library.opcheck(mssa_kernel._backward, (w.detach(), upstream, 0.3, 16, 4))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype, tokens, head_dim",
    [
        (torch.bfloat16, mssa_kernel.MAX_TOKENS + 1, 4),
        (torch.float32, 4, mssa_kernel.MAX_HEAD_DIM + 1),
        (torch.float64, mssa_kernel.FLOAT64_MAX_TOKENS + 1, 4),
    ],
)
def test_fused_attention_refuses_what_one_program_cannot_hold(device, dtype, tokens, head_dim):
    w = torch.zeros(1, 1, tokens, head_dim, device=device, dtype=dtype)
    with pytest.raises(ValueError, match=f"{tokens} tokens of head dimension {head_dim}"):
        fused_symmetric_attention(w, 1.0)


def test_the_model_knows_the_kernel_s_limits():
    """crate.models.layers chooses the kernel without importing Triton, by copies of its limits."""
    assert (layers.KERNEL_MAX_TOKENS, layers.KERNEL_MAX_HEAD_DIM) == (
        mssa_kernel.MAX_TOKENS,
        mssa_kernel.MAX_HEAD_DIM,
    )


def _mssa_calls(device: str, monkeypatch, selected: bool) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Kernel calls in one MSSA forward and backward (CRATE-T-like: 4 heads of 16, 17 tokens) with
    the kernel enabled or not, and the input gradients of that run and of the explicit path."""
    calls = []

    def counted(w, scale):
        calls.append(w.shape)
        return mssa_kernel.FusedSymmetricAttention.apply(w, scale, "rows")

    monkeypatch.setattr(mssa_kernel, "fused_symmetric_attention", counted)
    torch.manual_seed(0)
    mssa = layers.MSSA(dim=64, heads=4, head_dim=16).to(device)
    y = torch.randn(2, 17, 64, device=device)
    gradients = []
    for fused in (True, False):
        mssa.fused_attn = fused
        x = y.clone().requires_grad_()
        with layers.kernel_enabled(selected):
            mssa(x).square().sum().backward()
        gradients.append(x.grad)
    return len(calls), *gradients


@pytest.mark.parametrize("device", DEVICES)
def test_mssa_trains_through_the_kernel_on_cuda_only_when_selected(device, monkeypatch):
    """The kernel enabled: MSSA's fused training path calls it once per forward on CUDA, never on
    the CPU; disabled, never. The gradient equals the explicit path's within float32 rounding
    (1e-4 relative: 17 tokens, sums of ~1e2 terms of size ~1, u ≈ 6e-8, margin ~10)."""
    calls, fused, explicit_grad = _mssa_calls(device, monkeypatch, selected=True)
    assert calls == (1 if device == "cuda" else 0)
    assert_close(fused, explicit_grad, 1e-4 * (1 + max_abs(explicit_grad)), "input gradient")
    assert _mssa_calls(device, monkeypatch, selected=False)[0] == 0


def test_a_compiled_mssa_follows_the_kernel_switch(monkeypatch):
    """One torch.compile'd attention, the switch turned off, on, off: each call takes the path the
    switch names, with no reset (torch 2.14 folds an os.environ read into the graph unguarded, so a
    step compiled with the kernel off would keep SDPA when it is turned on, and a second model of the
    same shape could reuse that graph). The CPU stands in for CUDA, a marker for the kernel."""
    monkeypatch.setattr(layers, "_kernel_fits", lambda w: True)
    monkeypatch.setattr(layers, "_kernel_attention", lambda w, scale: -w)
    attention = torch.compile(
        lambda w: layers.subspace_attention(w, 0.5, True), backend="eager", fullgraph=True
    )
    w = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    paths = []
    for enabled in (False, True, False):
        with layers.kernel_enabled(enabled):
            paths.append(torch.equal(attention(w), -w))
    assert paths == [False, True, False]


@pytest.mark.parametrize("value", ["1", "0"])
def test_the_environment_variable_sets_the_switch_at_import(value):
    """CRATE_MSSA_KERNEL=1 when crate is imported enables the kernel, anything else leaves it off."""
    code = "from crate.models import layers; print(layers._kernel_on)"
    env = {**os.environ, layers.KERNEL_VARIABLE: value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(value == "1")


AHEAD_OF_TIME = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from crate.models import mssa_kernel as k

wide_rows = min(k.TILES.backward_rows, k.WIDE_BACKWARD_BLOCK_M)
rows, out = {2: k.TILES.backward_rows, 4: wide_rows, 8: wide_rows}, {}
for dtype, size in (("bf16", 2), ("fp16", 2), ("fp32", 4), ("fp64", 8)):
    wide = "fp64" if size == 8 else "fp32"
    tokens, head_dim = (k.MAX_TOKENS, k.MAX_HEAD_DIM)
    if size == 8:
        tokens, head_dim = (k.FLOAT64_MAX_TOKENS, k.FLOAT64_MAX_HEAD_DIM)
    blocks = dict(BLOCK_N=tokens, BLOCK_P=max(16, head_dim))
    triangle = ("W", "OUT", "TOP", "TOTAL", "ACC", "SCALE")
    for name, kernel, pointers, block_m in (
        ("forward", k._forward_kernel, ("W", "OUT", "SCALE"), k.TILES.forward_rows),
        ("backward", k._backward_kernel, ("W", "DO", "SCRATCH", "DW", "SCALE"), rows[size]),
        ("triangle forward", k._triangle_forward_kernel, triangle, k.TILES.forward_rows),
    ):
        signature = {p: "*" + (dtype if p in ("W", "OUT", "DO", "DW") else wide) for p in pointers}
        signature.update(N="i32", P="i32")
        values = dict(BLOCK_M=block_m, **blocks)
        if kernel is k._triangle_forward_kernel:
            values.pop("BLOCK_N")
        signature.update({name: "constexpr" for name in values})
        names = list(signature)
        source = ASTSource(kernel, signature, constexprs={(names.index(n),): v for n, v in values.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        out[f"{dtype} {name}"] = compiled.metadata.shared
json.dump(out, sys.stdout)
"""
A100_SHARED_BYTES = 163 * 1024  # the most shared memory one block may use on an A100 (H100: 227 KiB)


@pytest.mark.slow
def test_kernels_compile_for_sm90_within_an_a100_s_shared_memory():
    """Triton compiles the kernels for an H100 (sm_90) on any machine: each dtype's at its largest
    sizes (MAX_TOKENS, MAX_HEAD_DIM; float64 FLOAT64_MAX_*) compiles to a cubin whose shared memory
    fits one block of an A100, so the sizes the module accepts launch (measured 40-128 KiB). In a
    subprocess without TRITON_INTERPRET, which this suite sets without CUDA; ~2 minutes on 2 cores."""
    pytest.importorskip("triton.backends.nvidia")
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", AHEAD_OF_TIME], capture_output=True, text=True, env=environment, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    shared = json.loads(result.stdout)
    print(shared)
    assert len(shared) == 12
    assert all(bytes_ <= A100_SHARED_BYTES for bytes_ in shared.values()), shared
