"""Throughput (images/s), FLOP utilisation and peak memory: the fast CRATE against the naive
formulation (benchmarks/naive.py) and timm's ViT of comparable size, inference and training step.

Ratios come from interleaved rounds within one run (fast, naive, ViT, fast, ...; medians of the
per-round ratios), never across runs: absolute speed on shared machines drifts by 20–25%.
`python -m benchmarks.report RESULTS.json` prints the table. Nothing here fails on speed.
"""

import contextlib
import ctypes
import statistics
import threading
import time
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import crate
from benchmarks.naive import NaiveCRATE


def build(kind: str, size: str, bench) -> torch.nn.Module:
    name = f"crate_{size}_patch16_224"
    overrides = bench.model_kwargs()
    if kind == "fast":
        model = timm.create_model(name, **overrides)
    elif kind == "naive":
        model = NaiveCRATE(crate.variant_config(name, **overrides))
    else:
        model = timm.create_model(f"vit_{size}_patch16_224", **overrides)
    return model.to(bench.device)


def _images(bench) -> tuple[torch.Tensor, torch.Tensor]:
    side = 32 if bench.smoke else 224
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(bench.batch, 3, side, side, generator=generator).to(bench.device)
    return images, torch.randint(0, 1000, (bench.batch,), generator=generator).to(bench.device)


def step_function(model: torch.nn.Module, mode: str, bench):
    """One inference forward, or one training step (forward, backward, AdamW)."""
    images, targets = _images(bench)
    autocast = torch.autocast(bench.device.type, dtype=torch.bfloat16, enabled=bench.amp)
    if mode == "inference":
        model.eval()

        def run():
            with torch.no_grad(), autocast:
                model(images)
    else:
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def run():
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = F.cross_entropy(model(images), targets)
            loss.backward()
            optimizer.step()

    def synchronized():
        run()
        if bench.device.type == "cuda":
            torch.cuda.synchronize()

    return synchronized


def flops_per_image(model: torch.nn.Module, mode: str, bench) -> float:
    """Counted on the benchmark's batch, then divided by it: per-call costs (the fast ISTA builds its
    d×d matrix once per call) are amortised as they are in the timed steps."""
    images, targets = _images(bench)
    counter = FlopCounterMode(display=False)
    with counter:
        logits = model(images)
        if mode == "train":
            F.cross_entropy(logits, targets).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops()) / bench.batch


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """Peak memory increase during the block, MiB: the CUDA allocator's peak, or on CPU the resident
    set size sampled every millisecond (an approximation: the CPU allocator keeps no peak)."""
    result = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield result
        torch.cuda.synchronize()
        result["mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        return
    page = 4096
    statm = Path("/proc/self/statm")
    if not statm.exists():
        yield result
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back, so the step must take it again
    base = int(statm.read_text().split()[1]) * page
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], int(statm.read_text().split()[1]) * page)
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    yield result
    done.set()
    thread.join()
    result["mib"] = (peak[0] - base) / 2**20


def matmul_peak_gflops(bench) -> float:
    """Measured matmul peak of this device in this run (float32 2048³ on CPU, bf16 8192³ on GPU)."""
    n, dtype = (
        (256, torch.float32)
        if bench.smoke
        else ((8192, torch.bfloat16) if bench.amp else (2048, torch.float32))
    )
    a = torch.randn(n, n, device=bench.device, dtype=dtype)
    b = torch.randn(n, n, device=bench.device, dtype=dtype)
    times = []
    for _ in range(3 if bench.smoke else 6):
        start = time.perf_counter()
        a @ b
        if bench.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times[1:] or times) / 1e9


@pytest.fixture(scope="session")
def peak(bench) -> float:
    return matmul_peak_gflops(bench)


KINDS = ("fast", "naive", "vit")


@pytest.mark.parametrize("mode", ["inference", "train"])
@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_interleaved_throughput(benchmark, bench, peak, size, mode):
    """One benchmark round = one timed step of each model, in rotating order."""
    if size not in bench.sizes:
        pytest.skip("--bench-smoke runs the tiny size only")
    models = {kind: build(kind, size, bench) for kind in KINDS}
    models["naive"].load_state_dict(models["fast"].state_dict())  # the same weights, the same function
    steps = {kind: step_function(model, mode, bench) for kind, model in models.items()}
    for step in steps.values():
        step()  # warm-up
    seconds = {kind: [] for kind in KINDS}
    rotation = [0]

    def one_round():
        order = KINDS[rotation[0] % 3 :] + KINDS[: rotation[0] % 3]
        rotation[0] += 1
        for kind in order:
            start = time.perf_counter()
            steps[kind]()
            seconds[kind].append(time.perf_counter() - start)

    benchmark.pedantic(one_round, rounds=bench.rounds, warmup_rounds=0)
    memory = {}
    for kind, step in steps.items():
        with peak_memory(bench.device) as measured:
            step()
        memory[kind] = measured.get("mib")
    info = dict(
        size=size,
        mode=mode,
        batch=bench.batch,
        device=_device_name(bench),
        amp=bench.amp,
        matmul_peak_gflops=peak,
    )
    for kind in KINDS:
        images_per_s = sorted(bench.batch / s for s in seconds[kind])
        flops = flops_per_image(models[kind], mode, bench)
        info[kind] = dict(
            images_per_s=dict(
                min=images_per_s[0], median=statistics.median(images_per_s), max=images_per_s[-1]
            ),
            gflops_per_image=flops / 1e9,
            utilisation=statistics.median(images_per_s) * flops / 1e9 / peak,
            peak_memory_mib=memory[kind],
        )
    for other in ("naive", "vit"):
        ratios = [o / f for f, o in zip(seconds["fast"], seconds[other], strict=True)]
        info[f"fast_over_{other}"] = dict(min=min(ratios), median=statistics.median(ratios), max=max(ratios))
    benchmark.extra_info.update(info)


def _device_name(bench) -> str:
    if bench.device.type == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({torch.get_num_threads()} threads)"


# -- every speed option of the fast model, on CRATE-T -----------------------------------------------
def _ista_forms(weight: torch.Tensor, eta: float = 0.1, lam: float = 0.1):
    return {
        "one matmul (fast model)": lambda u: F.relu(u + u @ (eta * (weight - weight.T @ weight)) - eta * lam),
        "two matmuls": lambda u: F.relu(u + eta * (u - u @ weight.T) @ weight - eta * lam),
        "three matmuls (official)": lambda u: F.relu(
            u + eta * (F.linear(u, weight.T) - F.linear(F.linear(u, weight), weight.T)) - eta * lam
        ),
    }


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_ista_forms(benchmark, bench, mode):
    dim, tokens = (64, 17) if bench.smoke else (384, 197)
    weight = torch.nn.Parameter(torch.empty(dim, dim, device=bench.device))
    torch.nn.init.kaiming_uniform_(weight)
    u = torch.randn(bench.batch, tokens, dim, device=bench.device, requires_grad=mode == "train")
    forms = _ista_forms(weight)
    seconds = {name: [] for name in forms}

    def one_round():
        for name, form in forms.items():
            start = time.perf_counter()
            with torch.set_grad_enabled(mode == "train"):
                out = form(u)
                if mode == "train":
                    out.sum().backward()
            if bench.device.type == "cuda":
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - start)

    benchmark.pedantic(one_round, rounds=bench.rounds * 3, warmup_rounds=1)
    medians = {name: statistics.median(s) for name, s in seconds.items()}
    benchmark.extra_info.update(
        mode=mode,
        device=_device_name(bench),
        milliseconds={k: v * 1e3 for k, v in medians.items()},
        speedup_over_official=medians["three matmuls (official)"] / medians["one matmul (fast model)"],
    )


OPTIONS = {
    "explicit attention": dict(fused_attn=False),
    "gradient checkpointing": dict(grad_checkpointing=True),
    "torch.compile": dict(compile=True),
    "bf16 autocast": dict(amp=True),
}


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("mode", ["inference", "train"])
def test_speed_options(benchmark, bench, option, mode):
    """Each option against the default CRATE-T (SDPA for inference, explicit attention under
    autograd, float32), interleaved; speed-up = default time / option time."""
    settings = OPTIONS[option]
    if settings.get("compile") and bench.smoke:
        pytest.skip("torch.compile takes tens of seconds: full runs only")
    overrides = bench.model_kwargs()
    default = timm.create_model("crate_tiny_patch16_224", **overrides).to(bench.device)
    variant = timm.create_model(
        "crate_tiny_patch16_224", fused_attn=settings.get("fused_attn", True), **overrides
    ).to(bench.device)
    variant.load_state_dict(default.state_dict())
    if settings.get("grad_checkpointing"):
        variant.set_grad_checkpointing(True)
    if settings.get("compile"):
        variant = torch.compile(variant)
    amp_bench = type(bench)(
        bench.smoke, bench.device, bench.batch, bench.rounds, settings.get("amp", bench.amp)
    )
    steps = {
        "default": step_function(default, mode, bench),
        "option": step_function(variant, mode, amp_bench),
    }
    for step in steps.values():
        step()
    seconds = {name: [] for name in steps}

    def one_round():
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - start)

    benchmark.pedantic(one_round, rounds=bench.rounds, warmup_rounds=0)
    ratios = [d / o for d, o in zip(seconds["default"], seconds["option"], strict=True)]
    benchmark.extra_info.update(
        option=option,
        mode=mode,
        device=_device_name(bench),
        speedup=dict(min=min(ratios), median=statistics.median(ratios), max=max(ratios)),
    )


def test_naive_baseline_computes_the_fast_models_function(bench):
    """The baseline must be the same function: same weights, same logits (float32 tolerance)."""
    fast = build("fast", "tiny", bench).eval()
    naive = build("naive", "tiny", bench).eval()
    naive.load_state_dict(fast.state_dict())
    images, _ = _images(bench)
    with torch.no_grad():
        # float32, other op order (explicit attention, three-matmul ISTA): measured 9.5e-7 on logits ~2
        torch.testing.assert_close(naive(images), fast(images), rtol=0, atol=1e-5)
