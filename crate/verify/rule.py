"""The precision rule (docs/math.md §8), after the FlashAttention test suite: a fast path's error
against the float64 reference must be within a small factor of the error that a plain implementation
makes in the same precision,

    max|fast − ref| <= 2·max|plain − ref| + 4u(1 + max|ref|),

u the unit roundoff of the precision. For a pure low-precision run the inputs and parameters are
rounded to the low dtype once and the reference runs in float64 on those rounded values; for an
autocast run the float32 master values are the inputs."""

import contextlib
from dataclasses import dataclass

import torch

from ..runtime import uses_bf16

# name: (dtype of tensors, autocast dtype or None, unit roundoff u); "tf32" is float32 with TF32
# matmuls allowed (CUDA only; 10-bit mantissa)
PRECISIONS = {
    "float64": (torch.float64, None, 2.0**-53),
    "float32": (torch.float32, None, 2.0**-24),
    "tf32": (torch.float32, None, 2.0**-11),
    "bfloat16": (torch.bfloat16, None, 2.0**-8),
    "float16": (torch.float16, None, 2.0**-11),
    "bf16-autocast": (torch.float32, torch.bfloat16, 2.0**-8),
}
FACTOR = 2  # the fast path may err this many times the plain implementation's error


@dataclass(frozen=True)
class Errors:
    """Max abs errors against the float64 reference, and the rule's bound."""

    fast: float
    plain: float
    reference_max: float
    u: float

    @property
    def bound(self) -> float:
        return FACTOR * self.plain + 4 * self.u * (1 + self.reference_max)

    @property
    def holds(self) -> bool:
        return self.fast <= self.bound  # False for a NaN error

    @property
    def ratio(self) -> float:
        return self.fast / self.plain if self.plain else float("inf")

    def __str__(self) -> str:
        return (
            f"fast {self.fast:.3e}, plain {self.plain:.3e} (ratio {self.ratio:.2f}), bound {self.bound:.3e}"
        )


def default_precision(device: torch.device, amp: bool = True) -> str:
    """The precision a training run on ``device`` uses (crate/runtime.py): bf16 autocast or float32."""
    return "bf16-autocast" if uses_bf16(device, amp) else "float32"


def errors(fast: torch.Tensor, plain_result: torch.Tensor, ref: torch.Tensor, u: float) -> Errors:
    def error(tensor):
        return (tensor.detach().double().cpu() - ref).abs().max().item() if ref.numel() else 0.0

    ref = ref.detach().double().cpu()
    return Errors(error(fast), error(plain_result), ref.abs().max().item() if ref.numel() else 0.0, u)


def rounded(state: dict, precision: str) -> tuple[dict, dict]:
    """(values the fast and plain code run on, the same values in float64 for the reference)."""
    dtype = PRECISIONS[precision][0]
    low = {key: value.to(dtype) for key, value in state.items()}
    return low, {key: value.double() for key, value in low.items()}


@contextlib.contextmanager
def autocast(precision: str, device: str | torch.device = "cpu"):
    """The precision policy of ``precision``: autocast, and TF32 matmuls for "tf32" (else TF32 off)."""
    device_type = torch.device(device).type
    autocast_dtype = PRECISIONS[precision][1]
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        with torch.autocast(
            device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
        ):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
