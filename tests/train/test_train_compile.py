"""The compiled training step (crate/train/compiled.py): the model's forward and loss through
torch.compile, the backward through AOTAutograd, the fused optimizer. It reaches the eager step's
parameters; it is on by default on CUDA only (the CPU stays eager: compiling a step there takes ~25 s
on 2 cores, cold); --compile / --no-compile force either and stay session options on --resume; the
opening lines name it; the gate runs on the compiled model.

Compiling on the CPU is slow, so only one test here compiles in the default run (a one-layer CRATE
at 8×8 pixels, ~5 s with torch's compile cache warm, ~25 s cold); the end-to-end run with --compile
is marked slow."""

import copy
import dataclasses
import json
import logging

import pytest
import torch
import torch.nn.functional as F

from crate import CRATE
from crate.runtime import cpu_has_native_bf16
from crate.train import ConfigError, resolve_config, train
from crate.train.compiled import SDPA_BACKENDS, compiles, forward_loss, sdpa_backend
from crate.train.setup import check_sdpa_backend, set_fused
from tests.helpers import fast_config

STEPS = 3


def _tiny_run(compiled: bool) -> tuple[dict, dict]:
    """(initial, final) parameters of a one-layer CRATE after STEPS AdamW steps in float32, the step
    compiled with the fused AdamW kernel, or eager with its default multi-tensor loop."""
    torch.manual_seed(0)
    model = CRATE(img_size=8, patch_size=4, in_chans=1, num_classes=3, dim=16, depth=1, heads=2).train()
    initial = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert set_fused(optimizer, compiled) == compiled
    step_loss = forward_loss(
        model,
        torch.nn.CrossEntropyLoss(),
        lambda: torch.autocast("cpu", enabled=False),
        "default" if compiled else None,
    )
    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        images = torch.randn(4, 1, 8, 8, generator=generator)
        step_loss(images, torch.randint(0, 3, (4,), generator=generator)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return initial, model.state_dict()


def test_the_compiled_step_reaches_the_eager_steps_parameters():
    """Bounded, not bit for bit: the compiled forward and backward fuse operations (other rounding
    orders) and the fused AdamW kernel rounds its update apart from the multi-tensor loop. Measured,
    largest difference after 3 steps: 6.0e-8 (one float32 ulp at magnitudes below 1) against changes
    of 2.9e-3 to 3.0e-3 (2026-12-07, AMD EPYC, 2 cores). The bound, 4 ulps of 1 plus 1% of the change,
    leaves a margin of 4 over the rounding and fails when a gradient or an update is wrong by a
    factor (it moves the step by a fraction of the change itself)."""
    initial, eager = _tiny_run(compiled=False)
    _, compiled = _tiny_run(compiled=True)
    for key in eager:
        change = (eager[key] - initial[key]).abs().max().item()
        difference = (eager[key] - compiled[key]).abs().max().item()
        assert change > 0, key
        assert difference <= 1e-2 * change + 2.4e-7, (key, difference, change)


def test_compile_is_on_by_default_on_cuda_only_and_either_option_forces_it():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert compiles(None, cuda) and not compiles(None, cpu)
    assert compiles(True, cpu) and not compiles(False, cuda)
    assert resolve_config([]).compile is None
    assert resolve_config(["--compile"]).compile is True
    assert resolve_config(["--no-compile"]).compile is False


def test_fused_only_where_the_optimizer_has_the_kernel():
    parameters = [torch.nn.Parameter(torch.zeros(2))]
    adamw = torch.optim.AdamW(parameters)
    assert set_fused(adamw, True) and adamw.param_groups[0]["fused"] is True
    assert not set_fused(adamw, False) and adamw.param_groups[0]["fused"] is None
    assert not set_fused(torch.optim.Adadelta(parameters), True)  # no fused kernel


def test_compile_options_are_session_options_of_a_resumed_run(tmp_path):
    config = resolve_config(["--output", str(tmp_path), "--no-compile"])
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    resumed = resolve_config(
        ["--output", str(tmp_path), "--resume", "--compile", "--compile-mode", "reduce-overhead"]
    )
    assert resumed.compile is True and resumed.compile_mode == "reduce-overhead"
    assert dataclasses.replace(resumed, compile=False, compile_mode="default", resume=False) == config


def test_bad_compile_mode_and_sdpa_backend_are_explained(tmp_path):
    with pytest.raises(ConfigError, match="--compile-mode must be one of default, reduce-overhead"):
        resolve_config(["--compile-mode", "fast"])
    with pytest.raises(ConfigError, match="--sdpa-backend must be auto or one of cudnn, flash"):
        resolve_config(["--sdpa-backend", "triton"])
    if not torch.cuda.is_available():
        refusal = "--sdpa-backend cudnn has no kernel on cpu: use flash, math or auto"
        with pytest.raises(ConfigError, match=refusal):
            train(fast_config(tmp_path, "--sdpa-backend", "cudnn", "--max-steps", "1"))


def _sdpa_runs(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether PyTorch itself runs attention forward and backward with only this backend allowed."""
    tokens = torch.randn(2, 3, 17, 8, device=device, dtype=dtype, requires_grad=True)
    try:
        with sdpa_backend(backend):
            F.scaled_dot_product_attention(tokens, tokens, tokens).sum().backward()
    except RuntimeError:
        return False
    return True


CUDA = torch.device("cuda")
DEVICES = [
    torch.device("cpu"),
    pytest.param(CUDA, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "float32"])
@pytest.mark.parametrize("backend", list(SDPA_BACKENDS))
@pytest.mark.parametrize("device", DEVICES, ids=["cpu", "cuda"])
def test_sdpa_backends_are_refused_exactly_where_pytorch_cannot_run_them(device, backend, dtype):
    """check_sdpa_backend's verdict against PyTorch's own: a backend passes the check on a device in a
    precision if and only if scaled_dot_product_attention runs there with only that backend allowed
    (torch 2.14 on a CPU: flash and math, in any precision)."""
    runs = _sdpa_runs(backend, device, dtype)
    if runs:
        check_sdpa_backend(backend, device, bf16=dtype == torch.bfloat16)
    else:
        with pytest.raises(ConfigError, match=f"--sdpa-backend {backend} .*: use "):
            check_sdpa_backend(backend, device, bf16=dtype == torch.bfloat16)


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "float32"])
@pytest.mark.parametrize("backend", ["auto", *SDPA_BACKENDS])
def test_cuda_backends_follow_pytorchs_dtype_rule(backend, bf16):
    """The CUDA rows, checked without a GPU: every backend under bf16 autocast, and in float32 all but
    cudnn and flash, whose CUDA kernels take fp16/bf16 only (PyTorch's check_dtypes_low_precision)."""
    if bf16 or backend not in ("cudnn", "flash"):
        check_sdpa_backend(backend, CUDA, bf16)
    else:
        with pytest.raises(
            ConfigError,
            match=rf"{backend} takes bf16 or fp16 only on cuda .*\(--no-amp\): use efficient, math or auto",
        ):
            check_sdpa_backend(backend, CUDA, bf16)


def _opening(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "crate.train"]


@pytest.mark.parametrize("option", [[], ["--no-compile"]], ids=["default", "no-compile"])
def test_the_opening_lines_say_the_cpu_step_is_eager(tmp_path, caplog, option):
    if torch.cuda.is_available():
        pytest.skip("the CPU's default")
    with caplog.at_level(logging.INFO, "crate.train"):
        train(fast_config(tmp_path, "--max-steps", "1", "--telemetry-batch", "0", *option))
    given = "option" if option else "default for cpu"
    assert f"step: torch.compile off (eager; {given}), AdamW, SDPA backend auto" in _opening(caplog)
    assert "first step: " in caplog.text and "s (eager)" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["--amp", "--no-amp"], ids=["bf16-autocast", "float32"])
def test_a_compiled_run_names_its_step_and_is_gated_on_the_compiled_model(tmp_path, caplog, precision):
    """--compile on the CPU end to end: the opening lines name the compiled step and its first step's
    (compile) time, and the gate checked the compiled model (verification.json) and passed. In float32
    it refused before the patch embedding's shift (crate.models.layers.shifted): 9 of 91 quantities,
    the embedding's output on Fashion-MNIST's flat background 5.3e-4 against eager's 3.3e-5, measured
    2026-12-07. ~60 s on 2 cores, cold."""
    if precision == "--amp" and not cpu_has_native_bf16():
        pytest.skip("bf16 autocast needs native bf16 on the CPU")
    with caplog.at_level(logging.INFO, "crate.train"):
        train(fast_config(tmp_path, "--max-steps", "3", "--log-every", "2", precision, "--compile"))
    lines = _opening(caplog)
    assert "step: torch.compile on (mode default; option), AdamW fused, SDPA backend auto" in lines
    assert any(
        line.startswith("first step: ") and line.endswith("(torch.compile compiling the step)")
        for line in lines
    )
    gate = json.loads((tmp_path / "verification.json").read_text())
    assert gate["passed"] is True and gate["reports"][0]["compiled"] is True
    assert gate["reports"][0]["options"]["compile_mode"] == "default"
