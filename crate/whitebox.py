"""White-box telemetry of a fast CRATE model, computed in float64 (math.md §7).

Per layer ℓ: the compression R̂^c (normalised head-tokens, ε = 0.1, the official tool's convention)
of the layer's input LN₁(Z^ℓ) and of the stream after its MSSA step LN₁(Z^{ℓ+½}), both against the
layer's own subspaces U^ℓ; and the fraction of non-zero entries of its ISTA output Z^{ℓ+1}.
"""

import torch
import torch.nn.functional as F

import reference

from .model import CRATE


def _layer_norm64(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x.double(), norm.normalized_shape, norm.weight.double(), norm.bias.double(), norm.eps)


@torch.no_grad()
def layer_measurements(model: CRATE, images: torch.Tensor, eps: float = 0.1) -> list[dict]:
    """One dict per layer; each value is a (B,) float64 tensor of per-image numbers."""
    was_training = model.training
    model.eval()
    states = model.forward_intermediates(images, intermediates_only=True, return_layer_states=True)
    model.train(was_training)
    rows = []
    for layer, (state, block) in enumerate(zip(states, model.blocks, strict=True)):
        U = block.attn.qkv.weight.double().unflatten(0, (block.attn.heads, -1)).transpose(-2, -1)  # (K, d, p)
        rows.append(
            dict(
                layer=layer,
                compression_in=reference.compression_rate(
                    _layer_norm64(state.input, block.norm1), U, eps, True
                ),
                compression_out=reference.compression_rate(
                    _layer_norm64(state.mssa, block.norm1), U, eps, True
                ),
                nonzero=(state.ista != 0).double().mean((-2, -1)),
            )
        )
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """JSON-ready means and standard deviations over the images."""

    def stats(values: torch.Tensor) -> dict:
        return dict(mean=values.mean().item(), std=values.std().item() if values.numel() > 1 else 0.0)

    return [
        dict(
            layer=row["layer"],
            compression_in=stats(row["compression_in"]),
            compression_out=stats(row["compression_out"]),
            compression_change=stats(row["compression_out"] - row["compression_in"]),
            nonzero=stats(row["nonzero"]),
        )
        for row in rows
    ]


def format_table(summary: list[dict]) -> str:
    def stat(entry: dict) -> str:
        return f"{entry['mean']:9.3f} ± {entry['std']:7.3f}"

    lines = [
        f"{'layer':>5} | {'R^c in (LN1 Z^l)':>19} | {'R^c after MSSA':>19} | "
        f"{'change':>8} | {'non-zero':>17}",
        "-" * 82,
    ]
    for row in summary:
        lines.append(
            f"{row['layer']:>5} | {stat(row['compression_in'])} | {stat(row['compression_out'])} | "
            f"{row['compression_change']['mean']:+8.3f} | {stat(row['nonzero'])}"
        )
    return "\n".join(lines)
