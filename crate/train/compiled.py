"""The training step compiled: the model's forward and its loss in one torch.compile region (the backward
through AOTAutograd, the graph it derives), the optimizer a fused kernel where it has one; and the
SDPA kernel pinned for the whole run. The trainer and the GPU benchmarks build the step from here, so
that the benchmarks measure what training runs.

Why the optimizer is fused and not compiled: torch 2.14 does not trace a fused optimizer (its
``_fused_adamw`` is wrapped in ``torch.compiler.disable``, "don't trace into fused optimizer"), and
the fused kernel already updates every parameter in a few multi-tensor launches.
benchmarks/test_throughput.py's test_optimizer_step measures it against the compiled foreach step of
PyTorch's recipe ("compiling the optimizer", with the learning rate as a tensor).
"""

import contextlib
import inspect
from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

# torch.compile's modes; "reduce-overhead" and "max-autotune" replay the step as CUDA graphs
MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
SDPA_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
# The kernels PyTorch has for each device type, and whether each takes fp16/bf16 only (cuDNN's and
# flash's CUDA kernels: check_dtypes_low_precision); a device type not named here has math only
SDPA_KERNELS = {
    "cuda": {"cudnn": True, "flash": True, "efficient": False, "math": False},
    "cpu": {"flash": False, "math": False},
}


def compiles(setting: bool | None, device: torch.device) -> bool:
    """--compile / --no-compile, or by default: compiled on CUDA, eager on the CPU (compiling there
    takes longer than a short CPU run saves)."""
    return device.type == "cuda" if setting is None else setting


def forward_loss(
    model: torch.nn.Module, criterion: Callable, autocast: Callable, compile_mode: str | None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(images, targets) -> loss, the forward under ``autocast()``; through torch.compile in
    ``compile_mode`` (None: eager). The caller's ``loss.backward()`` runs the compiled backward."""

    def loss(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with autocast():
            return criterion(model(images), targets)

    if compile_mode is None:
        return loss
    compiled = torch.compile(loss, mode=compile_mode)
    if compile_mode not in CUDA_GRAPH_MODES:
        return compiled

    def replayed(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs may be overwritten
        return compiled(images, targets)

    return replayed


def takes_fused(optimizer_class: type) -> bool:
    """Whether a torch.optim class has a fused kernel (its constructor takes ``fused``)."""
    return "fused" in inspect.signature(optimizer_class.__init__).parameters


@contextlib.contextmanager
def sdpa_backend(name: str):
    """Pin F.scaled_dot_product_attention to one backend (cudnn, flash, efficient, math) for the
    block; "auto": PyTorch's own choice, unchanged."""
    if name == "auto":
        yield
        return
    with sdpa_kernel(SDPA_BACKENDS[name]):
        yield
