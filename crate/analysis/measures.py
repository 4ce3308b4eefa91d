"""The white-box measurements, per layer ℓ, all in float64 (docs/math.md §7), as JSON-ready dicts.

Both families:
- compression R^c of the layer's input LN₁(Z^ℓ) and of the stream after its MSSA step LN₁(Z^{ℓ+½}),
  normalised head-tokens (the official tool's convention, ε = 0.1) and raw, and the change;
- how far each U_k is from orthonormal, max_k ‖U_kᵀU_k − I‖₂, and the coherence between heads,
  max_{j≠k} ‖U_jᵀU_k‖₂ / (‖U_j‖₂‖U_k‖₂).

CRATE (ISTA block, one step warm-started at u = LN₂(Z^{ℓ+½}), square D):
- sparsity of the ISTA output Z^{ℓ+1} (fraction of non-zeros);
- η·‖D‖₂², the ISTA step-size condition (≤ 1 means η ≤ 1/L);
- the LASSO objective ½‖u − Du‖² + λ‖·‖₁ at the ISTA step's start u (without the non-negativity
  indicator, which u violates) and at its output.

CRATE-α (ODL block, docs/crate-alpha.md §2: two proximal-gradient steps from a = 0 on the
over-complete LASSO f(a) = ½‖u − Da‖² + λ‖a‖₁ + 𝟙{a ≥ 0}, D ∈ R^{d×m}, m = 4d, decoded by D₁; the
output stream Z^{ℓ+1} = Z^{ℓ+½} + D₁a₂ is not sparse, because of the residual, so the codes are measured):
- the codes a₁, a₂ recomputed in float64 by the layer's own ``odl.codes`` (on a float64 copy of D)
  from u = LN₂(Z^{ℓ+½}); their sparsity (fraction non-zero of the N·m entries);
- f at the zero start (= ½‖u‖²), after step 1 and after step 2: non-increasing whenever
  η‖D‖₂² ≤ 2 (the descent theorem), and η·‖D‖₂² itself;
- the decoder's distance from the encoder, ‖D₁ − D‖_F / ‖D‖_F (0: tied, the LASSO's reconstruction).
"""

import contextlib
import copy

import torch
import torch.nn.functional as F

import reference

from ..models import CRATE
from ..models.alpha import AlphaBlock

EPS = 0.1


def layer_norm64(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x.double(), norm.normalized_shape, norm.weight.double(), norm.bias.double(), norm.eps)


def subspaces(block) -> torch.Tensor:
    """U of a layer, (K, d, p) float64: U_k = (rows k·p..(k+1)·p−1 of the qkv weight)ᵀ."""
    return block.attn.qkv.weight.double().unflatten(0, (block.attn.heads, -1)).transpose(-2, -1)


def orthonormality_gap(U: torch.Tensor) -> float:
    eye = torch.eye(U.shape[-1], dtype=U.dtype, device=U.device)
    return torch.linalg.matrix_norm(U.transpose(-1, -2) @ U - eye, ord=2).max().item()


def coherence(U: torch.Tensor) -> float:
    K = U.shape[0]
    if K < 2:
        return 0.0
    norms = torch.linalg.matrix_norm(U, ord=2)
    cross = torch.linalg.matrix_norm(U[:, None].transpose(-1, -2) @ U[None], ord=2) / (
        norms[:, None] * norms[None]
    )
    return cross[~torch.eye(K, dtype=torch.bool, device=U.device)].max().item()


@contextlib.contextmanager
def one_thread(device: torch.device):
    """The small dense decompositions of the weights (SVDs of d × p bases, the d × d Gram) in one CPU
    thread: on busy cores threaded LAPACK spends far longer synchronising than these small problems
    take to solve."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def stats(values: torch.Tensor) -> dict:
    return dict(mean=values.mean().item(), std=values.std().item() if values.numel() > 1 else 0.0)


@torch.no_grad()
def audit(model: CRATE, images: torch.Tensor, eps: float = EPS) -> list[dict]:
    """One JSON-ready dict per layer: per-image quantities as mean/std over the batch. CRATE-α
    layers (AlphaBlock) get the ODL block's fields, CRATE layers the ISTA block's (module docstring)."""
    was_training = model.training
    model.eval()
    states = model.forward_intermediates(images, intermediates_only=True, return_layer_states=True)
    model.train(was_training)
    return [
        (_alpha_layer if isinstance(block, AlphaBlock) else crate_layer)(layer, state, block, eps)
        for layer, (state, block) in enumerate(zip(states, model.blocks, strict=True))
    ]


def _compression(state, block, eps: float) -> tuple[torch.Tensor, dict]:
    """(U, per-image R^c of the MSSA step's input and output, normalised and raw)."""
    U = subspaces(block)
    y_in, y_out = layer_norm64(state.input, block.norm1), layer_norm64(state.mssa, block.norm1)
    return U, rates(y_in, y_out, U, eps)


def rates(y_in: torch.Tensor, y_out: torch.Tensor, U: torch.Tensor, eps: float) -> dict:
    """Per-image R^c of a step's (normalised) input and output, with and without unit head-tokens."""
    return {
        name: reference.compression_rate(y, U, eps, normalize=normalize)
        for name, y, normalize in [
            ("in", y_in, True),
            ("out", y_out, True),
            ("raw_in", y_in, False),
            ("raw_out", y_out, False),
        ]
    }


def compression_fields(compression: dict) -> dict:
    return dict(
        compression_in=stats(compression["in"]),
        compression_out=stats(compression["out"]),
        compression_change=stats(compression["out"] - compression["in"]),
        raw_compression_in=stats(compression["raw_in"]),
        raw_compression_out=stats(compression["raw_out"]),
    )


def crate_layer(layer: int, state, block, eps: float) -> dict:
    U, compression = _compression(state, block, eps)
    D = block.ista.weight.double()
    u = layer_norm64(state.mssa, block.norm2)
    output = state.ista.double()
    eta, lam = block.ista.eta, block.ista.lam
    lasso_start = reference.lasso_data_term(u, u, D) + lam * u.abs().sum((-2, -1))
    lasso_end = reference.lasso_objective(output, u, D, lam)
    with one_thread(D.device):
        eta_lipschitz = eta * torch.linalg.matrix_norm(D, ord=2).item() ** 2
        gap, cross = orthonormality_gap(U), coherence(U)
    return dict(
        layer=layer,
        **compression_fields(compression),
        nonzero=stats((state.ista != 0).double().mean((-2, -1))),
        eta_lipschitz=eta_lipschitz,
        lasso_start=stats(lasso_start),
        lasso_end=stats(lasso_end),
        orthonormality_gap=gap,
        head_coherence=cross,
    )


def alpha_codes(block: AlphaBlock, z_half: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u, a₁, a₂) in float64 for a CRATE-α layer whose stream after MSSA is ``z_half``: u = LN₂(z_half),
    and the codes of the layer's own ``odl.codes`` run on a float64 copy of the block (D, D₁, η, λ)."""
    odl = copy.deepcopy(block.odl).double()
    u = layer_norm64(z_half, block.norm2)
    a1, a2 = odl.codes(u)
    return u, a1, a2


def _alpha_layer(layer: int, state, block: AlphaBlock, eps: float) -> dict:
    U, compression = _compression(state, block, eps)
    D, D1 = block.odl.D.double(), block.odl.D1.double()
    eta, lam = block.odl.eta, block.odl.lam
    u, a1, a2 = alpha_codes(block, state.mssa)
    with one_thread(D.device):
        eta_lipschitz = eta * _spectral_norm_squared(D)
        gap, cross = orthonormality_gap(U), coherence(U)
    return dict(
        layer=layer,
        **compression_fields(compression),
        nonzero_a1=stats((a1 != 0).double().mean((-2, -1))),
        nonzero_a2=stats((a2 != 0).double().mean((-2, -1))),
        eta_lipschitz=eta_lipschitz,
        lasso_start=stats(reference.lasso_objective(torch.zeros_like(a1), u, D, lam)),
        lasso_step1=stats(reference.lasso_objective(a1, u, D, lam)),
        lasso_step2=stats(reference.lasso_objective(a2, u, D, lam)),
        decoder_drift=((D1 - D).norm() / D.norm()).item(),  # Frobenius
        orthonormality_gap=gap,
        head_coherence=cross,
    )


def _spectral_norm_squared(D: torch.Tensor) -> float:
    """‖D‖₂² = the largest eigenvalue of the smaller Gram, DDᵀ (d × d) for CRATE-α's d × 4d D: an
    eigenvalue problem of size d, where matrix_norm(ord=2) takes the SVD of the wide D."""
    gram = D @ D.T if D.shape[0] <= D.shape[1] else D.T @ D
    return torch.linalg.eigvalsh(gram)[-1].item()
