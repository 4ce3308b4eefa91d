"""MSSA's attention block on CUDA: crate/models/mssa_kernel.py's fused Triton kernels against
F.scaled_dot_product_attention (the training path on CUDA in half precision), symmetric_attention
(the path in float32) and the explicit matmul-softmax under autograd, bf16, at the heads of CRATE-T,
-S and -B (batch 256, 197 tokens). CUDA only: skipped on the CPU, where the kernels only run
interpreted (verification/test_mssa_kernel.py).

Per form, interleaved rounds (rotating order, medians), forward alone (no gradient) and forward +
backward: milliseconds, TFLOP/s and peak memory above the inputs. The FLOPs are the same count for
every form, so that TFLOP/s ranks them as time does: 4·B·K·N²·p for the forward (S = s·WWᵀ and P·W),
10·B·K·N²·p with the backward (symmetric_attention's three N×N×p products: dP, Pᵀ·dO, (dS + dSᵀ)·W).
The kernel's backward computes five (S recomputed, dS·W and dSᵀ·W apart). This benchmark, on a GPU,
decides whether the kernel becomes MSSA's training path (CRATE_MSSA_KERNEL, crate.models.layers),
and with which forward tiling (row blocks, or the upper triangle of S: 19% fewer FLOPs at N = 197).
The tile sweep (test_kernel_tiles) times the kernels' launch shapes (mssa_kernel.Tiles: query rows
per program or step, warps) at CRATE-B's heads, each checked against the precision rule in bf16
first; the fastest that keeps it is the candidate for mssa_kernel.TILES.
Nothing here fails on speed; the forms are checked to compute the same function first.
"""

import dataclasses
import functools
import statistics

import pytest
import torch
import torch.nn.functional as F

from benchmarks.test_compile_choices import fastest, interleaved
from benchmarks.test_throughput import peak_memory, rotated_rounds
from crate.models.attention import symmetric_attention
from verification.test_symmetric_attention import SIZES, rule_errors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernels run compiled on CUDA only")

# CRATE variant: (heads K, head dimension p = d / K); batch 256, N = 197 (196 patches and cls)
HEADS = {"CRATE-T": (6, 64), "CRATE-S": (12, 48), "CRATE-B": (12, 64)}
BATCH, TOKENS = 256, 197


def forms() -> dict:
    from crate.models.mssa_kernel import fused_symmetric_attention

    return {
        "kernel (row blocks)": fused_symmetric_attention,
        "kernel (triangle)": lambda w, scale: fused_symmetric_attention(w, scale, "triangle"),
        "SDPA": lambda w, scale: F.scaled_dot_product_attention(w, w, w, scale=scale),
        "symmetric_attention": symmetric_attention,
        "explicit (autograd)": lambda w, scale: ((w @ w.transpose(-2, -1)) * scale).softmax(dim=-1) @ w,
    }


def _call(form, w: torch.Tensor, scale: float, upstream: torch.Tensor, mode: str) -> None:
    if mode == "forward":
        with torch.no_grad():
            form(w, scale)
    else:
        w.grad = None
        form(w, scale).backward(upstream)
    torch.cuda.synchronize()


@pytest.mark.parametrize("mode", ["forward", "train"])
@pytest.mark.parametrize("variant", list(HEADS))
def test_attention_kernel(benchmark, bench, variant, mode):
    heads, head_dim = HEADS[variant]
    batch = 2 if bench.smoke else BATCH
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(batch, heads, TOKENS, head_dim, generator=generator) / 3**0.5  # released init's
    w = w.to("cuda", torch.bfloat16).requires_grad_(mode == "train")
    upstream = torch.randn(w.shape, generator=generator).to("cuda", torch.bfloat16)
    scale = head_dim**-0.5
    chosen = forms()
    reference = chosen["explicit (autograd)"](w.detach().double(), scale)
    for name, form in chosen.items():  # the same function, to bf16's rounding (|out| ≲ 1, u = 2⁻⁸)
        error = (form(w.detach(), scale).double() - reference).abs().max().item()
        assert error < 0.05, f"{name}: max abs error {error:.3g} against float64"
    calls = {name: functools.partial(_call, form, w, scale, upstream, mode) for name, form in chosen.items()}
    _, seconds = rotated_rounds(benchmark, calls, rounds=bench.rounds * 3, warmup_rounds=1)  # compiles first
    memory = {}
    for name, form in chosen.items():
        with peak_memory(w.device) as measured:
            _call(form, w, scale, upstream, mode)
        memory[name] = measured.get("mib")
    flops = (4 if mode == "forward" else 10) * batch * heads * TOKENS**2 * head_dim
    milliseconds = {name: statistics.median(s) * 1e3 for name, s in seconds.items()}
    benchmark.extra_info.update(
        block="MSSA attention kernel",
        model=variant,
        mode=mode,
        device=torch.cuda.get_device_name(),
        dtype="bfloat16",
        batch=batch,
        tokens=TOKENS,
        heads=heads,
        head_dim=head_dim,
        milliseconds=milliseconds,
        tflops={name: flops / (ms * 1e-3) / 1e12 for name, ms in milliseconds.items()},
        peak_memory_mib=memory,
    )


def _tile_candidates(kernel: str) -> dict:
    """Name → (tiling, Tiles) of every launch shape the sweep times for one kernel; the others at TILES."""
    from crate.models.mssa_kernel import CANDIDATE_ROWS, CANDIDATE_WARPS, TILES, TILINGS

    shapes = [(rows, warps) for rows in CANDIDATE_ROWS for warps in CANDIDATE_WARPS]
    if kernel == "backward":
        return {
            f"backward {rows} rows, {warps} warps": (
                "rows",
                dataclasses.replace(TILES, backward_rows=rows, backward_warps=warps),
            )
            for rows, warps in shapes
        }
    return {  # not the triangle in tiles of 16 rows: 91 tiles in sequence per head
        f"{tiling} {rows} rows, {warps} warps": (
            tiling,
            dataclasses.replace(TILES, forward_rows=rows, forward_warps=warps),
        )
        for tiling in TILINGS
        for rows, warps in shapes
        if (tiling, rows) != ("triangle", 16)
    }


@pytest.mark.parametrize("kernel", ["forward", "backward"])
def test_kernel_tiles(benchmark, bench, kernel):
    """The forward's launch shapes (both tilings) timed forward alone, the backward's forward +
    backward (the forward at TILES), at CRATE-B's heads (batch 256, 12 × 197 × 64, bf16). A shape that
    does not launch (shared memory, registers) is noted; each that does is checked against the
    precision rule in bf16, soft and peaky, at batch 2 (verification/test_symmetric_attention.py's
    rule_errors), and only those that keep it may be chosen."""
    from triton.runtime.errors import OutOfResources

    from crate.models.mssa_kernel import fused_symmetric_attention

    heads, head_dim = HEADS["CRATE-B"]
    batch = 2 if bench.smoke else BATCH
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(batch, heads, TOKENS, head_dim, generator=generator) / 3**0.5
    w = w.to("cuda", torch.bfloat16).requires_grad_(kernel == "backward")
    upstream = torch.randn(w.shape, generator=generator).to("cuda", torch.bfloat16)
    mode, timed = ("forward", "forward alone") if kernel == "forward" else ("train", "forward+backward")
    calls, holds, unavailable = {}, {}, {}
    for name, (tiling, tiles) in _tile_candidates(kernel).items():
        form = functools.partial(fused_symmetric_attention, tiling=tiling, tiles=tiles)
        try:
            errors = [rule_errors(form, "bfloat16", peaky, "cuda", SIZES["base"]) for peaky in (False, True)]
        except OutOfResources as error:  # more shared memory or registers than the GPU has (a TritonError)
            unavailable[name] = str(error).splitlines()[0]
            continue
        holds[name] = all(e.holds for pair in errors for e in pair)
        calls[name] = functools.partial(_call, form, w, head_dim**-0.5, upstream, mode)
    measured = interleaved(benchmark, bench, calls, bench.rounds * 3)
    for name, entry in measured.items():
        entry["holds"] = holds[name]
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(),
        choice=f"kernel tile: the {kernel} (mssa_kernel.TILES)",
        shapes=f"CRATE-B: {batch}×{heads}×{TOKENS}×{head_dim}, bf16, {timed}",
        candidates=measured,
        unavailable=unavailable,
        chosen=fastest(measured, lambda name: measured[name]["holds"]),
    )
