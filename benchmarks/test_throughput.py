"""Throughput (images/s), FLOP utilisation and peak memory: the fast CRATE and CRATE-α against their
naive formulations (benchmarks/naive.py) and timm's ViT of comparable size, inference and training step.

Ratios come from interleaved rounds within one run (CRATE fast, CRATE naive, [CRATE-α fast, CRATE-α
naive,] ViT, rotating; medians of the per-round ratios), never across runs: absolute speed on shared
machines drifts by 20–25%. `python -m benchmarks.report RESULTS.json` prints the tables. Nothing here
fails on speed; the consistency checks (naive = fast, forms = each other) fail on a wrong function.
"""

import contextlib
import ctypes
import dataclasses
import functools
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import crate
import crate.models.alpha
from benchmarks.naive import NaiveCRATE, NaiveCRATEAlpha, OvercompleteISTA
from crate.models.attention import symmetric_attention
from crate.models.layers import kernel_enabled
from crate.models.model import ista_step
from crate.train.compiled import forward_loss
from crate.train.setup import set_fused
from reference import proximal_gradient_steps
from verification.test_symmetric_attention import saved_bytes

# family: (timm name of a size, the naive formulation's class and config builder, or None)
FAMILIES = {
    "crate": ("crate_{size}_patch16_224", (NaiveCRATE, crate.variant_config)),
    "crate_alpha": ("crate_alpha_{size}_patch16_224", (NaiveCRATEAlpha, crate.alpha_variant_config)),
    "vit": ("vit_{size}_patch16_224", None),
}


def build(family: str, kind: str, size: str, bench) -> torch.nn.Module:
    """kind "fast" (the registered model, timm's for ViT) or "naive" (benchmarks/naive.py)."""
    template, naive = FAMILIES[family]
    name = template.format(size=size)
    overrides = bench.model_kwargs()
    if kind == "naive":
        model_class, config = naive
        model = model_class(config(name, **overrides))
    else:
        model = timm.create_model(name, **overrides)
    return model.to(bench.device)


def run_models(size: str, bench, mode: str = "inference") -> list[tuple[str, str]]:
    """(family, kind) of every model of one interleaved run at this size, in the run's order; in a
    training run with bench.compile, each fast model (ViT's too) also "compiled": its training step
    as crate train compiles it (crate/train/compiled.py: forward and loss in one region, fused AdamW)."""
    families = ["crate", *(["crate_alpha"] if size in bench.alpha_sizes else [])]
    keys = [(family, kind) for family in families for kind in ("fast", "naive")] + [("vit", "fast")]
    if mode == "train" and bench.compile:
        keys += [(family, "compiled") for family in [*families, "vit"]]
    return keys


def _images(bench) -> tuple[torch.Tensor, torch.Tensor]:
    side = 32 if bench.smoke else 224
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(bench.batch, 3, side, side, generator=generator).to(bench.device)
    return images, torch.randint(0, 1000, (bench.batch,), generator=generator).to(bench.device)


def step_function(model: torch.nn.Module, mode: str, bench, compile_mode: str | None = None):
    """One inference forward, or one training step (forward, backward, AdamW): eager with AdamW's
    multi-tensor loop, or with ``compile_mode`` the trainer's compiled step and its fused AdamW."""
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
        set_fused(optimizer, compile_mode is not None)
        loss_of = forward_loss(
            model,
            F.cross_entropy,
            lambda: torch.autocast(bench.device.type, dtype=torch.bfloat16, enabled=bench.amp),
            compile_mode,
        )

        def run():
            optimizer.zero_grad(set_to_none=True)
            loss_of(images, targets).backward()
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


def rotated_rounds(
    benchmark, calls: dict, rounds: int, warmup_rounds: int = 0
) -> tuple[dict[object, float], dict[object, list[float]]]:
    """Interleaved timing: each call once per round, the order rotating so that none always runs first
    (a machine's slow moment falls on all alike). The calls return when their work is done (they
    synchronise an asynchronous device themselves). Returns each call's first run's seconds (the
    warm-up, where a compiled call compiles) and its seconds in every round."""
    first = {}
    for key, call in calls.items():
        start = time.perf_counter()
        call()
        first[key] = time.perf_counter() - start
    keys = list(calls)
    seconds = {key: [] for key in keys}
    rotation = [0]

    def one_round():
        start_at = rotation[0] % len(keys)
        rotation[0] += 1
        for key in keys[start_at:] + keys[:start_at]:
            start = time.perf_counter()
            calls[key]()
            seconds[key].append(time.perf_counter() - start)

    benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=warmup_rounds)
    return first, seconds


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """Peak memory increase during the block, MiB: the CUDA allocator's peak, or on CPU the bytes in
    use on glibc's heap (mallinfo2: heap chunks plus mmapped blocks, the CPU's closest to CUDA's
    allocated bytes), else the resident set size; sampled every millisecond (an approximation: the
    CPU allocator keeps no peak). The resident set also counts freed memory the allocator keeps."""
    result = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield result
        torch.cuda.synchronize()
        result["mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        return
    used = cpu_bytes_in_use()
    if used is None:
        yield result
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back, so the step must take it again
    base = used()
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], used())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    yield result
    done.set()
    thread.join()
    result["mib"] = (peak[0] - base) / 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


def cpu_bytes_in_use() -> Callable[[], int] | None:
    """A function returning the process's heap bytes in use (glibc ≥ 2.33), else its resident set
    size (Linux), else None."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        statm = Path("/proc/self/statm")
        if not statm.exists():
            return None
        return lambda: int(statm.read_text().split()[1]) * 4096
    mallinfo2.restype = _MallInfo2

    def in_use() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd

    return in_use


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


class MatmulPeak:
    """The best matmul rate measured so far in this run: measured again after each throughput test,
    since a slow moment of the machine during one measurement (165 against 218 GFLOP/s in one CPU
    run) would put every utilisation above 100%."""

    def __init__(self, bench):
        self.bench, self.gflops = bench, matmul_peak_gflops(bench)

    def measure(self) -> float:
        self.gflops = max(self.gflops, matmul_peak_gflops(self.bench))
        return self.gflops


@pytest.fixture(scope="session")
def peak(bench) -> MatmulPeak:
    return MatmulPeak(bench)


@pytest.mark.parametrize("mode", ["inference", "train", "latency"])
@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_interleaved_throughput(benchmark, bench, peak, size, mode):
    """One benchmark round = one timed step of each model of the size, in rotating order: CRATE fast
    and naive, CRATE-α fast and naive at bench.alpha_sizes (B/16 in full runs), timm's ViT.
    "latency" is inference at batch 1, a deployment's case."""
    if size not in bench.sizes:
        pytest.skip("--bench-smoke runs the tiny size only")
    run_mode = mode
    if mode == "latency":
        bench, run_mode = dataclasses.replace(bench, batch=1), "inference"
    keys = run_models(size, bench, run_mode)
    models = {key: build(*key, size, bench) for key in keys}
    for family, kind in keys:
        if kind != "fast":  # the same weights, the same function
            models[family, kind].load_state_dict(models[family, "fast"].state_dict())
    steps = {
        key: step_function(model, run_mode, bench, "default" if key[1] == "compiled" else None)
        for key, model in models.items()
    }
    warm_up, seconds = rotated_rounds(benchmark, steps, bench.rounds)  # a compiled step compiles first
    memory = {}
    for key, step in steps.items():
        with peak_memory(bench.device) as measured:
            step()
        memory[key] = measured.get("mib")
    peak_gflops = peak.measure()
    info = dict(
        size=size,
        mode=mode,
        batch=bench.batch,
        device=_device_name(bench),
        amp=bench.amp,
        matmul_peak_gflops=peak_gflops,
        models=[],
        ratios=[],
    )
    for family, kind in keys:
        model = models[family, kind]
        images_per_s = sorted(bench.batch / s for s in seconds[family, kind])
        flops = flops_per_image(model, run_mode, bench)
        info["models"].append(
            dict(
                family=family,
                kind=kind,
                name=FAMILIES[family][0].format(size=size),
                parameters=sum(p.numel() for p in model.parameters()),
                images_per_s=_spread(images_per_s),
                gflops_per_image=flops / 1e9,
                utilisation=statistics.median(images_per_s) * flops / 1e9 / peak_gflops,
                peak_memory_mib=memory[family, kind],
                first_step_s=warm_up[family, kind],  # of a compiled step: its compile time
            )
        )
    for family, kind in keys:
        if kind == "naive" or (family == "vit" and kind == "fast"):
            continue
        if kind == "fast":
            others = (("naive", seconds[family, "naive"]), ("vit", seconds["vit", "fast"]))
        else:  # compiled, over its eager self and over the compiled ViT
            others = (("eager", seconds[family, "fast"]), ("vit", seconds["vit", "compiled"]))
        for other, other_seconds in others:
            if family == "vit" and other == "vit":
                continue
            ratios = [o / f for f, o in zip(seconds[family, kind], other_seconds, strict=True)]
            info["ratios"].append(dict(family=family, kind=kind, fast_over=other, **_spread(ratios)))
    benchmark.extra_info.update(info)


def _spread(values: list[float]) -> dict[str, float]:
    return dict(min=min(values), median=statistics.median(values), max=max(values))


def _device_name(bench) -> str:
    if bench.device.type == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({torch.get_num_threads()} threads)"


# -- matmul forms of the sparse coding blocks, interleaved ------------------------------------------
Form = Callable[[torch.Tensor], torch.Tensor]


def time_forms(benchmark, bench, forms: dict[str, Form], u: torch.Tensor, weights: list, mode: str) -> dict:
    """Interleave the forms (rotating order), each one call per round: the forward (no grad), or
    forward and backward to u and the weights. Returns ms per call (median, min, max), GFLOP per
    call (FlopCounterMode) and each form's time over the first form's, per round. bf16 autocast on
    GPU, as the models run there."""
    names = list(forms)
    inputs = [u, *weights] if mode == "train" else []

    def call(form: Form) -> None:
        with torch.set_grad_enabled(mode == "train"):
            with torch.autocast(bench.device.type, dtype=torch.bfloat16, enabled=bench.amp):
                out = form(u)
            if mode == "train":
                for tensor in inputs:
                    tensor.grad = None  # no accumulation: each call computes the gradients afresh
                out.float().sum().backward()
        if bench.device.type == "cuda":
            torch.cuda.synchronize()

    calls = {name: functools.partial(call, forms[name]) for name in names}
    _, seconds = rotated_rounds(benchmark, calls, rounds=bench.rounds * 3, warmup_rounds=1)
    gflops = {}
    for name, form in forms.items():
        counter = FlopCounterMode(display=False)
        with counter:
            call(form)
        gflops[name] = counter.get_total_flops() / 1e9
    fast = seconds[names[0]]
    return dict(
        mode=mode,
        device=_device_name(bench),
        amp=bench.amp,
        fast_form=names[0],
        milliseconds={name: _spread([1e3 * t for t in s]) for name, s in seconds.items()},
        gflops_per_call=gflops,
        time_over_fast={
            name: _spread([o / f for f, o in zip(fast, s, strict=True)]) for name, s in seconds.items()
        },
    )


def _ista_forms(weight: torch.Tensor, eta: float = 0.1, lam: float = 0.1) -> dict[str, Form]:
    return {
        "one matmul (fast model)": lambda u: ista_step(u, weight, eta, lam),  # what the model runs
        "two matmuls": lambda u: F.relu(u + eta * (u - u @ weight.T) @ weight - eta * lam),
        "three matmuls (official)": lambda u: F.relu(
            u + eta * (F.linear(u, weight.T) - F.linear(F.linear(u, weight), weight.T)) - eta * lam
        ),
    }


@pytest.mark.skipif(cpu_bytes_in_use() is None, reason="no way to read the process's memory here")
def test_cpu_peak_memory_counts_a_tensor_alive_in_the_block():
    """64 MiB held for 20 ms (twenty samples) inside the block, freed before it ends: the peak is
    those 64 MiB, plus at most a few MiB of the interpreter's own allocations (measured: 64.005–64.05
    MiB over ten blocks, 2026-11-27, glibc's mallinfo2)."""
    with peak_memory(torch.device("cpu")) as measured:
        held = torch.ones(16 * 2**20)  # float32: 64 MiB, written, so resident too
        time.sleep(0.02)
        del held
    assert 64 <= measured["mib"] < 72


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_ista_forms(benchmark, bench, mode):
    """CRATE's ISTA step at CRATE-T's width (d 384, 197 tokens): the fast model's one token matmul
    against two and the official three."""
    dim, tokens = (64, 17) if bench.smoke else (384, 197)
    weight = torch.nn.Parameter(torch.empty(dim, dim, device=bench.device))
    torch.nn.init.kaiming_uniform_(weight)
    u = torch.randn(bench.batch, tokens, dim, device=bench.device, requires_grad=mode == "train")
    info = time_forms(benchmark, bench, _ista_forms(weight), u, [weight], mode)
    benchmark.extra_info.update(
        block="ISTA",
        model="CRATE-T" if not bench.smoke else "smoke",
        batch=bench.batch,
        tokens=tokens,
        dim=dim,
    )
    benchmark.extra_info.update(info)


class GramODL(crate.models.alpha.ODL):
    """The ODL block with its second step through the Gram matrix G = η·DᵀD (4d × 4d, built per call):
    a₁ − η(a₁Dᵀ − u)D = a₁ + η·uD − a₁G, so uD serves both steps."""

    def codes(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        threshold = self.eta * self.lam
        ud = self.eta * (u @ self.D)
        a1 = F.relu(ud - threshold)
        return a1, F.relu(a1 + ud - a1 @ (self.eta * (self.D.T @ self.D)) - threshold)


def odl_forms(dim: int, device: torch.device) -> dict[str, torch.nn.Module]:
    """The ODL block in three matmul forms sharing one D and D₁ (released init), each a module with
    codes(u) -> (a₁, a₂) and forward(u) -> a₂D₁ᵀ: the fast model's own (crate.models.alpha.ODL: token
    matmuls), the Gram form (GramODL), and the released einsums (benchmarks.naive.OvercompleteISTA)."""
    token = crate.models.alpha.ODL(dim)
    generator = torch.Generator().manual_seed(0)
    for weight in (token.D, token.D1):
        torch.nn.init.kaiming_uniform_(weight, generator=generator)  # the released init, reproducibly
    token = token.to(device)
    gram, einsum = GramODL(dim).to(device), OvercompleteISTA(dim).to(device)
    for other in (gram, einsum):
        other.D, other.D1 = token.D, token.D1
    return {"token matmuls (fast model)": token, "Gram 4d×4d per call": gram, "einsum (released)": einsum}


PLAIN_FORM = "einsum (released)"


def check_odl_forms(forms: dict[str, torch.nn.Module], u: torch.Tensor) -> dict:
    """Every form's float32 (a₁, a₂, output) against float64 ``reference.proximal_gradient_steps`` (two
    autograd proximal-gradient steps from zero, then D₁), by two criteria:

    1. every form, elementwise, within the worst-case float32 rounding bound, first order: a length-K
       dot product errs by at most γ_K·Σ|x_i y_i|, γ_K = K·u/(1 − K·u), u = 2⁻²⁴, in any summation
       order or blocking (Higham, Accuracy and Stability, §3.1), so
         a₁:  e₁ = γ_{d+3}·(η|u||D| + ηλ)
         a₂:  e₂ = e₁ + η(e₁|D|ᵀ)|D| + γ_{5d+4}·(|a₁| + η(|a₁||D|ᵀ + |u|)|D| + η|u||D| + ηλ)
         out: γ_{4d}·|a₂||D₁|ᵀ + e₂|D₁|ᵀ
       (the longest chain: 4d terms of a₁Dᵀ or a₁G after d of uD or G = ηDᵀD; e₁ carried through
       a₁ ↦ a₁ − ηa₁DᵀD; ReLU is 1-Lipschitz). Never fails on rounding; loose (measured errors are
       10⁻²–10⁻³ of it), so it catches only gross mistakes in the released einsum form;
    2. the fast and Gram forms by the project's FlashAttention rule (docs/math.md §8, row 28), with the
       released einsum form as the plain float32 implementation: max|form − ref| ≤
       2·max|einsum − ref| + 4u(1 + max|ref|), per output. Measured, largest error over this bound:
       token and einsum forms 0.24–0.27, Gram form 0.33–0.46 (CPU, d 192 and 768, 8 seeds; its a₂
       errs 1.4–2.2× the einsum form's), 0.57 (H100, batch 256); errors 1.4e-7–1.2e-6. A missing λ,
       η or u term errs by ~10⁻², 10⁴ times more.

    Returns the largest errors and the rule's bounds, per form and output."""
    assert u.dtype == torch.float32, "the bounds are float32's"
    plain = forms[PLAIN_FORM]
    D, D1, eta, lam, dim = plain.D.detach(), plain.D1.detach(), plain.eta, plain.lam, plain.D.shape[0]
    unit = 2.0**-24

    def gamma(k: int) -> float:
        return k * unit / (1 - k * unit)

    u64, D64, D164 = (t.detach().double() for t in (u, D, D1))
    a1, a2 = proximal_gradient_steps(u64, D64, eta, lam, steps=2)
    want = (a1, a2, a2 @ D164.T)
    au, aD, aD1, aa1, aa2 = (t.abs() for t in (u64, D64, D164, a1, a2))
    uD = eta * (au @ aD)
    e1 = gamma(dim + 3) * (uD + eta * lam)
    chain = aa1 + eta * ((aa1 @ aD.T + au) @ aD) + uD + eta * lam
    e2 = e1 + eta * ((e1 @ aD.T) @ aD) + gamma(5 * dim + 4) * chain
    worst_case = (e1, e2, gamma(4 * dim) * (aa2 @ aD1.T) + e2 @ aD1.T)
    outputs = ("a1", "a2", "out")
    errors = {}
    with torch.no_grad():
        for name, form in forms.items():
            got = (*form.codes(u), form(u))
            errors[name] = {}
            for output, g, w, bound in zip(outputs, got, want, worst_case, strict=True):
                error = (g.double() - w).abs()
                over = (error / bound).max().item()
                assert over <= 1, f"ODL form {name!r}, {output}: {over:.3g} × the float32 worst-case bound"
                errors[name][output] = error.max().item()
    rule = {
        output: 2 * errors[PLAIN_FORM][output] + 4 * unit * (1 + w.abs().max().item())
        for output, w in zip(outputs, want, strict=True)
    }
    for name in forms:
        for output in outputs:
            assert errors[name][output] <= rule[output], (
                f"ODL form {name!r}, {output}: error {errors[name][output]:.3g} over the FlashAttention "
                f"rule's {rule[output]:.3g} (2 × the released einsum form's + 4u(1 + max|ref|))"
            )
    return dict(max_error=errors, rule_bound=rule)


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_odl_forms(benchmark, bench, mode):
    """CRATE-α's ODL block at B/16 shapes (d 768, 4d 3072, 197 tokens; smoke: CRATE-α-T's d 192, 17
    tokens) in its three matmul forms (odl_forms), after checking that they compute the same codes."""
    dim, tokens = (192, 17) if bench.smoke else (768, 197)
    forms = odl_forms(dim, bench.device)
    generator = torch.Generator().manual_seed(1)
    u = F.layer_norm(torch.randn(bench.batch, tokens, dim, generator=generator), (dim,))  # as LN₂ feeds it
    u = u.to(bench.device).requires_grad_(mode == "train")
    check = check_odl_forms(forms, u)
    weights = list(forms[PLAIN_FORM].parameters())
    info = time_forms(benchmark, bench, forms, u, weights, mode)
    benchmark.extra_info.update(
        block="ODL",
        model="CRATE-α-B/16" if not bench.smoke else "smoke",
        batch=bench.batch,
        tokens=tokens,
        dim=dim,
        atoms=4 * dim,
        check=check,
    )
    benchmark.extra_info.update(info)


def attention_forms(scale: float) -> dict[str, Form]:
    """MSSA's attention softmax(s·WWᵀ)·W under autograd: symmetric_attention (the fast model's
    training path on the CPU), the explicit matmul-softmax path (the in-model oracle), and SDPA with
    autograd through its fused kernel (the training path on CUDA; see crate.models.layers.MSSA)."""
    return {
        "symmetric (CPU training)": lambda w: symmetric_attention(w, scale),
        "explicit (autograd)": lambda w: ((w @ w.transpose(-2, -1)) * scale).softmax(dim=-1) @ w,
        "SDPA (CUDA training)": lambda w: F.scaled_dot_product_attention(w, w, w, scale=scale),
    }


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_attention_forms(benchmark, bench, mode):
    """MSSA's attention at CRATE-T's shapes (6 heads of 64, 197 tokens; smoke: 2 heads of 16, 17
    tokens) in its three forms; train: forward and backward; also the bytes each keeps for backward."""
    heads, tokens, head_dim = (2, 17, 16) if bench.smoke else (6, 197, 64)
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(bench.batch, heads, tokens, head_dim, generator=generator) / 3**0.5  # released init's
    w = w.to(bench.device).requires_grad_(mode == "train")
    forms = attention_forms(head_dim**-0.5)
    info = time_forms(benchmark, bench, forms, w, [], mode)
    low = w.detach().to(torch.bfloat16 if bench.amp else torch.float32).requires_grad_()
    benchmark.extra_info.update(
        block="MSSA attention",
        model="CRATE-T" if not bench.smoke else "smoke",
        batch=bench.batch,
        tokens=tokens,
        heads=heads,
        head_dim=head_dim,
        saved_mib={name: saved_bytes(form, low) / 2**20 for name, form in forms.items()},
    )
    benchmark.extra_info.update(info)


# torch.compile is measured in the interleaved runs (their compiled rows), for every family and size
OPTIONS = {
    "explicit attention": dict(fused_attn=False),
    "gradient checkpointing": dict(grad_checkpointing=True),
    "bf16 autocast": dict(amp=True),
    "Triton MSSA kernel": dict(kernel=True),  # crate.models.layers.kernel_enabled(): CUDA training only
}


def with_kernel(step: Callable[[], None]) -> Callable[[], None]:
    """The step with MSSA's CUDA training path through the Triton kernel (a compiled step compiles
    with it and recompiles when it is off, see crate.models.layers), the previous setting after it."""

    def kernel_step():
        with kernel_enabled():
            step()

    return kernel_step


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("mode", ["inference", "train"])
def test_speed_options(benchmark, bench, option, mode):
    """Each option against the default CRATE-T (SDPA for inference, symmetric_attention under
    autograd), interleaved, in the run's precision (CPU float32, GPU bf16 autocast), except "bf16
    autocast", which is against float32 on either, and "Triton MSSA kernel", CUDA training only (the
    fused kernel against SDPA, eager); speed-up = default time / option time."""
    settings = OPTIONS[option]
    if settings.get("kernel") and (mode != "train" or bench.device.type != "cuda"):
        pytest.skip("the Triton kernel is MSSA's path in CUDA training only")
    overrides = bench.model_kwargs()
    default = timm.create_model("crate_tiny_patch16_224", **overrides).to(bench.device)
    variant = timm.create_model(
        "crate_tiny_patch16_224", fused_attn=settings.get("fused_attn", True), **overrides
    ).to(bench.device)
    variant.load_state_dict(default.state_dict())
    if settings.get("grad_checkpointing"):
        variant.set_grad_checkpointing(True)
    default_bench = dataclasses.replace(bench, amp=False) if settings.get("amp") else bench
    option_bench = dataclasses.replace(bench, amp=settings.get("amp", bench.amp))
    steps = {
        "default": step_function(default, mode, default_bench),
        "option": step_function(variant, mode, option_bench),
    }
    if settings.get("kernel"):
        steps["option"] = with_kernel(steps["option"])
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
        amp=dict(default=default_bench.amp, option=option_bench.amp),
        speedup=dict(min=min(ratios), median=statistics.median(ratios), max=max(ratios)),
    )


# float32, other op order (explicit attention; three-matmul ISTA or einsum ODL), logits ~2. Measured
# largest errors: CRATE-T 8.6e-7–1.1e-6 (smoke sizes, 3 seeds), 2.1e-6 (224², 12 layers, batch 8);
# CRATE-α-T 4.2e-7–4.8e-7 (smoke), 8.9e-7 (224², 12 layers, batch 8).
NAIVE_ATOL = 1e-5


@pytest.mark.parametrize("family", ["crate", "crate_alpha"])
def test_naive_baseline_computes_the_fast_models_function(bench, family):
    """The baseline must be the same function: same weights, same logits (float32 tolerance)."""
    fast = build(family, "fast", "tiny", bench).eval()
    naive = build(family, "naive", "tiny", bench).eval()
    naive.load_state_dict(fast.state_dict())
    images, _ = _images(bench)
    with torch.no_grad():
        torch.testing.assert_close(naive(images), fast(images), rtol=0, atol=NAIVE_ATOL)
