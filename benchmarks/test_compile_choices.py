"""The measurements that choose a training setting on CUDA, each candidate timed in interleaved rounds
(rotating order) in one run: the SDPA backend of MSSA's attention at N = 197 (with whether each keeps
the precision rule forward and backward: only those that do may be chosen), MSSA's attention in the
compiled training step (SDPA or the fused Triton kernel), the optimizer step (fused AdamW, its
multi-tensor loop, and that loop compiled as PyTorch's "compiling the optimizer" recipe has it), and
torch.compile's mode for a CRATE-T and CRATE-S training step.

`python -m benchmarks.report RUN.json RUN-choices.json` prints them with the fastest admissible
candidate marked; --results-json (benchmarks/conftest.py) writes each test's result as it finishes
(the tests run in that order, what decides a default first and the slowest compiles last). CUDA
only: compiling a step takes tens of seconds, and the CPU's choices are made (eager,
symmetric_attention). Nothing here fails on speed.
"""

import statistics
from collections.abc import Callable

import pytest
import timm
import torch
import torch.nn.functional as F

from benchmarks.test_throughput import rotated_rounds, step_function, with_kernel
from verification.test_symmetric_attention import SDPA_BACKENDS, SIZES, explicit, sdpa, sdpa_rule_errors

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-only: the choices are the GPU's")


def interleaved(benchmark, bench, candidates: dict[str, Callable[[], None]], rounds: int) -> dict:
    """ms per call of each candidate (one call each per round, rotating), its time over the first
    candidate's per round, and its first call's seconds (a compiled one compiles there)."""
    synchronised = {name: _synchronised(call) for name, call in candidates.items()}
    first_call, seconds = rotated_rounds(benchmark, synchronised, rounds, warmup_rounds=1)
    names = list(candidates)
    first = seconds[names[0]]
    return {
        name: dict(
            milliseconds=_spread([1e3 * t for t in s]),
            time_over_first=_spread([t / f for f, t in zip(first, s, strict=True)]),
            first_call_s=first_call[name],
        )
        for name, s in seconds.items()
    }


def _synchronised(call: Callable[[], None]) -> Callable[[], None]:
    def synchronised():
        call()
        torch.cuda.synchronize()

    return synchronised


def _spread(values: list[float]) -> dict[str, float]:
    return dict(min=min(values), median=statistics.median(values), max=max(values))


def fastest(candidates: dict, admissible=lambda name: True) -> str | None:
    names = [name for name in candidates if admissible(name)]
    return min(names, key=lambda name: candidates[name]["milliseconds"]["median"], default=None)


def _attention_call(attention: Callable, w: torch.Tensor, scale: float) -> Callable[[], None]:
    def call():
        w.grad = None
        attention(w, scale).sum().backward()

    return call


@CUDA
@pytest.mark.parametrize("size", list(SIZES))
def test_sdpa_backends(benchmark, bench, size):
    """MSSA's attention softmax(s·WWᵀ)·W forward and backward at batch 256, N = 197, CRATE-T/S/B's
    heads, bf16: each SDPA backend pinned, PyTorch's own choice ("auto") and the explicit path; with
    whether each keeps the precision rule in bf16, soft and peaky, forward and backward
    (verification/test_symmetric_attention.py, at batch 2). The choice: the fastest that keeps it."""
    layer = SIZES[size]
    heads, tokens, head_dim = layer["heads"], layer["tokens"], layer["head_dim"]
    batch = 8 if bench.smoke else bench.batch
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(batch, heads, tokens, head_dim, generator=generator) / 3**0.5
    w = w.to(bench.device, torch.bfloat16).requires_grad_()
    scale = head_dim**-0.5
    auto = lambda w, scale: F.scaled_dot_product_attention(w, w, w, scale=scale)  # noqa: E731
    attentions = {"auto": auto, **{name: sdpa(name) for name in SDPA_BACKENDS}, "explicit": explicit}
    holds, candidates = {}, {}
    for name, attention in attentions.items():
        try:
            _attention_call(attention, w, scale)()
        except RuntimeError as error:  # "No available kernel": the backend cannot run these shapes
            holds[name] = f"no kernel: {str(error).splitlines()[0]}"
            continue
        candidates[name] = _attention_call(attention, w, scale)
        if name in SDPA_BACKENDS:
            errors = [sdpa_rule_errors(name, "bfloat16", peaky, layer) for peaky in (False, True)]
            holds[name] = all(e.holds for pair in errors for e in pair)
    measured = interleaved(benchmark, bench, candidates, bench.rounds * 3)
    for name, entry in measured.items():
        entry["holds"] = holds.get(name) if isinstance(holds.get(name), bool) else None
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(),
        choice="SDPA backend (--sdpa-backend)",
        shapes=f"CRATE-{size[0].upper()}: {batch}×{heads}×{tokens}×{head_dim}, bf16, forward+backward",
        candidates=measured,
        unavailable={name: why for name, why in holds.items() if not isinstance(why, bool)},
        chosen=fastest(measured, lambda name: measured[name]["holds"] is True),
    )


KERNEL_OPERATOR = "crate::symmetric_attention_forward"  # crate/models/mssa_kernel.py's forward


def kernel_calls(step: Callable[[], None]) -> int:
    """Calls of the fused kernel's forward operator in one step (torch.profiler's operator events:
    a compiled graph calls a custom operator through the dispatcher, which records it)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        step()
    return sum(event.count for event in profile.key_averages() if event.key == KERNEL_OPERATOR)


@CUDA
@pytest.mark.parametrize("size", ["tiny"])
def test_mssa_path_in_the_compiled_step(benchmark, bench, size):
    """CRATE's training step as the trainer compiles it (default mode, fused AdamW, bf16 autocast),
    MSSA's attention through SDPA (today's CUDA path) and through the fused Triton kernel, and the
    kernel's eager step: whether the kernel pays where training runs. At CRATE-T, where attention is
    the largest share of a step (its 4N²d FLOPs over the 6Nd² of U, W_out and ISTA's one matmul:
    2N/3d, 0.34 at T, 0.17 at B). It may be chosen only where it keeps the precision rule on this
    GPU (verification/test_mssa_kernel.py -k cuda, in the same run). The kernel's calls per step are
    counted, so that a compiled step that kept SDPA cannot pass for the kernel's: each of the
    depth's layers once, and never in the SDPA step."""
    name = f"crate_{size}_patch16_224"
    models = [timm.create_model(name, **bench.model_kwargs()).to(bench.device) for _ in range(3)]
    for model in models[1:]:
        model.load_state_dict(models[0].state_dict())
    candidates = {
        "compiled, SDPA": step_function(models[0], "train", bench, "default"),
        "compiled, Triton kernel": with_kernel(step_function(models[1], "train", bench, "default")),
        "eager, Triton kernel": with_kernel(step_function(models[2], "train", bench)),
    }
    measured = interleaved(benchmark, bench, candidates, bench.rounds)
    calls = {candidate: kernel_calls(step) for candidate, step in candidates.items()}
    depth = len(models[0].blocks)
    assert calls == {"compiled, SDPA": 0, "compiled, Triton kernel": depth, "eager, Triton kernel": depth}
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(),
        choice="MSSA attention in the training step",
        shapes=f"CRATE-{size[0].upper()} train step, batch {bench.batch}",
        candidates=measured,
        chosen=fastest(measured),
    )


def _adamw_steps(model: torch.nn.Module) -> dict[str, Callable[[], None]]:
    """AdamW over the model's parameters with fixed random gradients: fused, its multi-tensor loop,
    and the loop through torch.compile with the learning rate a tensor (the recipe: a scheduler's new
    value is then data, not a recompile)."""
    parameters = list(model.parameters())
    generator = torch.Generator(device=parameters[0].device).manual_seed(0)
    for p in parameters:
        p.grad = torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype) * 1e-3
    fused = torch.optim.AdamW(parameters, lr=1e-4, fused=True)
    loop = torch.optim.AdamW(parameters, lr=1e-4, foreach=True)
    compiled = torch.optim.AdamW(parameters, lr=torch.tensor(1e-4))  # the recipe's: foreach by default
    return {"fused": fused.step, "foreach": loop.step, "foreach compiled": torch.compile(compiled.step)}


@CUDA
@pytest.mark.parametrize("name", ["crate_base_patch16_224"])
def test_optimizer_step(benchmark, bench, name):
    """The optimizer step alone over a B-size model's parameters (the trainer's: fused)."""
    if bench.smoke:
        pytest.skip("full runs only: compiling the optimizer takes tens of seconds")
    model = timm.create_model(name).to(bench.device)
    measured = interleaved(benchmark, bench, _adamw_steps(model), bench.rounds * 3)
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(),
        choice="optimizer step (AdamW)",
        shapes=f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters",
        candidates=measured,
        chosen=fastest(measured),
    )


# cheapest first, so that a time limit (benchmarks/run_gpu.sh) cuts the most expensive: the default
# mode's graphs are in the compile cache after the throughput runs; max-autotune tries Triton matmul
# templates per shape, its first call the longest
MODE_CASES = [
    ("tiny", "default"),
    ("tiny", "reduce-overhead"),
    ("small", "default"),
    ("small", "reduce-overhead"),
    ("tiny", "max-autotune-no-cudagraphs"),
    ("small", "max-autotune-no-cudagraphs"),
]


@CUDA
@pytest.mark.parametrize(("size", "mode"), MODE_CASES)
def test_compile_modes(benchmark, bench, size, mode):
    """A CRATE training step (batch 256, bf16 autocast, fused AdamW) compiled in one torch.compile
    mode against the eager step, interleaved: default, reduce-overhead (CUDA graphs),
    max-autotune-no-cudagraphs."""
    if bench.smoke:
        pytest.skip("full runs only: compiling takes tens of seconds per mode")
    name = f"crate_{size}_patch16_224"
    eager = timm.create_model(name).to(bench.device)
    model = timm.create_model(name).to(bench.device)
    model.load_state_dict(eager.state_dict())
    candidates = {
        "eager": step_function(eager, "train", bench),
        mode: step_function(model, "train", bench, mode),
    }
    measured = interleaved(benchmark, bench, candidates, bench.rounds)
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(),
        choice="torch.compile mode",
        shapes=f"CRATE-{size[0].upper()} train step, batch {bench.batch}",
        candidates=measured,
        chosen=fastest(measured),
    )
