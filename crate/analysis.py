"""White-box audit of a CRATE model: does each layer do what the paper says it does?

For a batch of images, per layer ℓ, all in float64 (math.md §7):
- compression R^c of the layer's input LN₁(Z^ℓ) and of the stream after its MSSA step LN₁(Z^{ℓ+½}),
  normalised head-tokens (the official tool's convention, ε = 0.1) and raw, and the change;
- sparsity of the ISTA output Z^{ℓ+1} (fraction of non-zeros);
- η·‖D‖₂², the ISTA step-size condition (≤ 1 means η ≤ 1/L);
- the LASSO objective ½‖u − Du‖² + λ‖·‖₁ at the ISTA step's start u = LN₂(Z^{ℓ+½}) (without the
  non-negativity indicator, which u violates) and at its output;
- how far each U_k is from orthonormal, max_k ‖U_kᵀU_k − I‖₂, and the coherence between heads,
  max_{j≠k} ‖U_jᵀU_k‖₂ / (‖U_j‖₂‖U_k‖₂).

Pictures: the per-layer figure of the paper (compression and sparsity against depth, with spread),
the cls token's attention per head over the image, and the PCA of the patch features (first three
components as RGB), as in "Emergence of Segmentation with Minimalistic White-Box Transformers".
"""

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import reference

from .model import CRATE

EPS = 0.1


def _layer_norm64(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x.double(), norm.normalized_shape, norm.weight.double(), norm.bias.double(), norm.eps)


def subspaces(block) -> torch.Tensor:
    """U of a layer, (K, d, p) float64: U_k = (rows k·p..(k+1)·p−1 of the qkv weight)ᵀ."""
    return block.attn.qkv.weight.double().unflatten(0, (block.attn.heads, -1)).transpose(-2, -1)


def _orthonormality_gap(U: torch.Tensor) -> float:
    eye = torch.eye(U.shape[-1], dtype=U.dtype)
    return torch.linalg.matrix_norm(U.transpose(-1, -2) @ U - eye, ord=2).max().item()


def _coherence(U: torch.Tensor) -> float:
    K = U.shape[0]
    if K < 2:
        return 0.0
    norms = torch.linalg.matrix_norm(U, ord=2)
    cross = torch.linalg.matrix_norm(U[:, None].transpose(-1, -2) @ U[None], ord=2) / (
        norms[:, None] * norms[None]
    )
    return cross[~torch.eye(K, dtype=torch.bool)].max().item()


def _stats(values: torch.Tensor) -> dict:
    return dict(mean=values.mean().item(), std=values.std().item() if values.numel() > 1 else 0.0)


@torch.no_grad()
def audit(model: CRATE, images: torch.Tensor, eps: float = EPS) -> list[dict]:
    """One JSON-ready dict per layer: per-image quantities as mean/std over the batch."""
    was_training = model.training
    model.eval()
    states = model.forward_intermediates(images, intermediates_only=True, return_layer_states=True)
    model.train(was_training)
    layers = []
    for layer, (state, block) in enumerate(zip(states, model.blocks, strict=True)):
        U, D = subspaces(block), block.ista.weight.double()
        y_in, y_out = _layer_norm64(state.input, block.norm1), _layer_norm64(state.mssa, block.norm1)
        u = _layer_norm64(state.mssa, block.norm2)
        output = state.ista.double()
        eta, lam = block.ista.eta, block.ista.lam
        compression = {
            name: reference.compression_rate(y, U, eps, normalize=normalize)
            for name, y, normalize in [
                ("in", y_in, True),
                ("out", y_out, True),
                ("raw_in", y_in, False),
                ("raw_out", y_out, False),
            ]
        }
        lasso_start = reference.lasso_data_term(u, u, D) + lam * u.abs().sum((-2, -1))
        lasso_end = reference.lasso_objective(output, u, D, lam)
        layers.append(
            dict(
                layer=layer,
                compression_in=_stats(compression["in"]),
                compression_out=_stats(compression["out"]),
                compression_change=_stats(compression["out"] - compression["in"]),
                raw_compression_in=_stats(compression["raw_in"]),
                raw_compression_out=_stats(compression["raw_out"]),
                nonzero=_stats((state.ista != 0).double().mean((-2, -1))),
                eta_lipschitz=eta * torch.linalg.matrix_norm(D, ord=2).item() ** 2,
                lasso_start=_stats(lasso_start),
                lasso_end=_stats(lasso_end),
                orthonormality_gap=_orthonormality_gap(U),
                head_coherence=_coherence(U),
            )
        )
    return layers


def markdown_table(layers: list[dict]) -> str:
    header = (
        "| layer | R^c in | R^c after MSSA | change | raw R^c in → out | non-zero | η‖D‖² "
        "| LASSO start → end | ‖UᵀU − I‖ | coherence |\n|---|---|---|---|---|---|---|---|---|---|"
    )

    def pm(entry: dict, digits: int = 2) -> str:
        return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"

    rows = [
        f"| {r['layer']} | {pm(r['compression_in'])} | {pm(r['compression_out'])} | "
        f"{r['compression_change']['mean']:+.2f} | {r['raw_compression_in']['mean']:.1f} → "
        f"{r['raw_compression_out']['mean']:.1f} | {pm(r['nonzero'], 3)} | {r['eta_lipschitz']:.3f} | "
        f"{r['lasso_start']['mean']:.1f} → {r['lasso_end']['mean']:.1f} | {r['orthonormality_gap']:.2f} | "
        f"{r['head_coherence']:.2f} |"
        for r in layers
    ]
    return "\n".join([header, *rows])


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


def plot_layers(layers: list[dict], path: Path, title: str = "") -> Path:
    """The paper's layer-wise figure: compression (before/after MSSA) and sparsity against depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth = np.arange(len(layers))

    def series(key):
        return np.array([r[key]["mean"] for r in layers]), np.array([r[key]["std"] for r in layers])

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label, color in [
        ("compression_in", "input LN₁(Z^ℓ)", "tab:blue"),
        ("compression_out", "after MSSA LN₁(Z^{ℓ+½})", "tab:orange"),
    ]:
        mean, std = series(key)
        left.plot(depth, mean, "o-", color=color, label=label)
        left.fill_between(depth, mean - std, mean + std, color=color, alpha=0.2)
    left.set(xlabel="layer ℓ", ylabel="R^c (normalised, ε = 0.1)", title="compression")
    left.legend()
    mean, std = series("nonzero")
    right.plot(depth, mean, "o-", color="tab:green")
    right.fill_between(depth, mean - std, mean + std, color="tab:green", alpha=0.2)
    right.set(xlabel="layer ℓ", ylabel="‖Z^{ℓ+1}‖₀ / (N·d)", title="sparsity (fraction non-zero)")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


@torch.no_grad()
def attention_maps(model: CRATE, images: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """The cls token's attention over the patches in ``layer``: (B, K, H/P, W/P)."""
    states = model.forward_intermediates(
        images, intermediates_only=True, return_layer_states=True, return_attention=True, indices=[layer]
    )
    attention = states[0].attention[:, :, 0, 1:]  # (B, K, patches): cls queries, patch keys
    return attention.unflatten(-1, model.patch_embed.grid_size)


@torch.no_grad()
def patch_pca(model: CRATE, images: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """First three principal components of the patch features of ``layer`` (over the whole batch),
    scaled to [0, 1] per component: (B, 3, H/P, W/P)."""
    (features,) = model.forward_intermediates(
        images, indices=[layer], output_fmt="NLC", intermediates_only=True
    )
    B, L, d = features.shape
    flat = features.double().reshape(B * L, d)
    flat = flat - flat.mean(0)
    _, _, V = torch.linalg.svd(flat, full_matrices=False)
    components = flat @ V[:3].T  # (B·L, 3)
    low, high = components.min(0).values, components.max(0).values
    components = (components - low) / (high - low).clamp_min(1e-12)
    return components.reshape(B, *model.patch_embed.grid_size, 3).permute(0, 3, 1, 2)


def _display(image: torch.Tensor, mean, std) -> np.ndarray:
    image = image.double().cpu() * torch.tensor(std, dtype=torch.float64)[:, None, None]
    image = (image + torch.tensor(mean, dtype=torch.float64)[:, None, None]).clamp(0, 1)
    return image.permute(1, 2, 0).squeeze(-1).numpy()


def plot_attention(model: CRATE, images: torch.Tensor, path: Path, layer: int = -1, mean=(0.5,), std=(0.5,)):
    """Per image: the image, each head's cls attention overlaid, the head average, and the PCA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = attention_maps(model, images, layer)
    maps = F.interpolate(maps.float(), size=images.shape[-2:], mode="nearest")
    pca = F.interpolate(patch_pca(model, images, layer).float(), size=images.shape[-2:], mode="nearest")
    B, K = maps.shape[:2]
    columns = K + 3
    figure, axes = plt.subplots(B, columns, figsize=(1.6 * columns, 1.7 * B), squeeze=False)
    for b in range(B):
        picture = _display(images[b], mean, std)
        panels = (
            [("image", None)] + [(f"head {k}", maps[b, k]) for k in range(K)] + [("mean", maps[b].mean(0))]
        )
        for column, (label, overlay) in enumerate(panels):
            axis = axes[b, column]
            axis.imshow(picture, cmap="gray")
            if overlay is not None:
                axis.imshow(overlay.numpy(), cmap="inferno", alpha=0.6)
            axis.set_title(label if b == 0 else "", fontsize=8)
        axes[b, -1].imshow(pca[b].permute(1, 2, 0).numpy())
        axes[b, -1].set_title("PCA" if b == 0 else "", fontsize=8)
    for axis in axes.flat:
        axis.axis("off")
    depth = len(model.blocks)
    figure.suptitle(f"cls-token attention, layer {layer % depth} (layers 0..{depth - 1})", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_report(
    model: CRATE,
    images: torch.Tensor,
    output: Path,
    title: str = "",
    mean=(0.5,),
    std=(0.5,),
    attention_images: int = 4,
    layer: int = -1,
) -> dict[str, Path]:
    """audit.json, audit.md, layers.png and attention.png in ``output``."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    layers = audit(model, images)
    paths = dict(json=output / "audit.json", markdown=output / "audit.md")
    paths["json"].write_text(
        json.dumps(dict(title=title, eps=EPS, images=len(images), layers=layers), indent=2)
    )
    paths["markdown"].write_text(
        f"# White-box audit{': ' + title if title else ''}\n\n{markdown_table(layers)}\n"
    )
    paths["layers"] = plot_layers(layers, output / "layers.png", title)
    paths["attention"] = plot_attention(
        model, images[:attention_images], output / "attention.png", layer=layer, mean=mean, std=std
    )
    return paths
