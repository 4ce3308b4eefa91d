"""Assertion helpers: they say what was compared, the error and the tolerance, and hide themselves
from tracebacks."""

import torch
from hypothesis import currently_in_test_context, note


def _note(message: str) -> None:
    if currently_in_test_context():
        note(message)


def max_abs(tensor: torch.Tensor) -> float:
    return tensor.abs().max().item() if tensor.numel() else 0.0


def assert_within(error: float, tolerance: float, what: str) -> None:
    __tracebackhide__ = True
    _note(f"{what}: error {error:.3e}, tolerance {tolerance:.3e}")
    if not error <= tolerance:
        raise AssertionError(f"{what}: error {error:.3e} exceeds the tolerance {tolerance:.3e}")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str) -> None:
    """max |actual − expected| <= tolerance, reporting where the worst entry is."""
    __tracebackhide__ = True
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    difference = (actual - expected).abs()
    error = difference.max().item() if difference.numel() else 0.0
    if not error <= tolerance:
        index = tuple(int(i) for i in torch.unravel_index(difference.argmax(), difference.shape))
        raise AssertionError(
            f"{what}: max abs error {error:.3e} exceeds the tolerance {tolerance:.3e} at index {index} "
            f"(actual {actual[index].item():.17g}, expected {expected[index].item():.17g})"
        )
    _note(f"{what}: max abs error {error:.3e} <= {tolerance:.3e}")


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()
