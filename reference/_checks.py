"""Input checks shared by the reference: float64 only, token-major shapes, positive constants."""

import torch


def require_float64(name: str, tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype != torch.float64:
        raise TypeError(
            f"{name} must be float64 (the reference computes in double precision only), got {tensor.dtype}; "
            f"convert it with .double()"
        )


def require_tokens(name: str, tensor) -> None:
    """Token-major tokens: (N, d) for one image or (B, N, d) for a batch, float64."""
    require_float64(name, tensor)
    if tensor.ndim not in (2, 3) or tensor.shape[-1] == 0 or tensor.shape[-2] == 0:
        raise ValueError(
            f"{name} must have shape (N, d) or (B, N, d) with N, d >= 1 (tokens are rows), "
            f"got {tuple(tensor.shape)}"
        )


def require_subspaces(U, dim: int) -> None:
    """U of shape (K, d, p): one d×p basis per head."""
    require_float64("U", U)
    if U.ndim != 3 or U.shape[1] != dim or U.shape[0] == 0 or U.shape[2] == 0:
        raise ValueError(f"U must have shape (K, d, p) = (K, {dim}, p) with K, p >= 1, got {tuple(U.shape)}")


def require_dictionary(D, dim: int, square: bool = True) -> None:
    """D of shape (d, d) (CRATE's ISTA), or (d, m) with m >= 1 atoms when not ``square`` (CRATE-α: m = 4d)."""
    require_float64("D", D)
    if square and D.shape != (dim, dim):
        raise ValueError(f"D must have shape (d, d) = ({dim}, {dim}), got {tuple(D.shape)}")
    if not square and (D.ndim != 2 or D.shape[0] != dim or D.shape[1] == 0):
        raise ValueError(f"D must have shape (d, m) = ({dim}, m) with m >= 1 atoms, got {tuple(D.shape)}")


def require_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def require_nonnegative(name: str, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
