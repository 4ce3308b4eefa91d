"""The audit's pictures: the paper's per-layer figure (compression and sparsity against depth, with
spread: the ISTA output's for CRATE, the codes' for CRATE-α), the attention per head over the image of
the tokens the head reads (the cls token, or all tokens averaged for a mean-pooled model), and the PCA
of the patch features (first three components as RGB), as in "Emergence of Segmentation with
Minimalistic White-Box Transformers"."""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..models import CRATE
from .tables import is_alpha


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path) -> Path:
    """``figure`` written to ``path`` (PNG) and closed."""
    figure.savefig(path, dpi=120)
    pyplot().close(figure)
    return path


def band_label(images: int | None) -> str:
    """The legend entry of the shaded bands: what their width is."""
    return f"shaded: mean ± 1 s.d. over the {f'{images} ' if images else ''}images"


def layers_figure(layers: list[dict], title: str = "", images: int | None = None):
    """The paper's layer-wise figure: compression (before/after MSSA) and sparsity against depth
    (CRATE: of the ISTA output Z^{ℓ+1}; CRATE-α: of the ODL codes a₂, and a₁ dashed), the lines the
    batch means, the bands one standard deviation over its images. Labels in mathtext ($...$)."""
    plt = pyplot()
    from matplotlib.patches import Patch

    depth = np.arange(len(layers))
    band = Patch(facecolor="gray", alpha=0.3, label=band_label(images))

    def draw(axis, key, label, style, color):
        mean = np.array([r[key]["mean"] for r in layers])
        std = np.array([r[key]["std"] for r in layers])
        axis.plot(depth, mean, style, color=color, label=label)
        axis.fill_between(depth, mean - std, mean + std, color=color, alpha=0.2)

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    draw(left, "compression_in", r"layer input $\mathrm{LN}_1(Z^{\ell})$", "o-", "tab:blue")
    draw(left, "compression_out", r"after MSSA $\mathrm{LN}_1(Z^{\ell+1/2})$", "o-", "tab:orange")
    left.set(
        ylabel=r"$R^c$ per image (nats; unit head-tokens, $\epsilon$ = 0.1)",
        title=r"compression $R^c$ (lower: more compressed)",
    )
    if is_alpha(layers):
        draw(right, "nonzero_a2", r"codes $a_2$ (the block's output codes)", "o-", "tab:green")
        draw(right, "nonzero_a1", r"codes $a_1$ (after the first step)", "s--", "tab:olive")
        right.set(ylabel=r"fraction of the $N \times 4d$ codes non-zero", title="sparsity of the ODL codes")
    else:
        draw(right, "nonzero", r"ISTA output $Z^{\ell+1}$", "o-", "tab:green")
        right.set(
            ylabel=r"fraction of the $N \times d$ entries non-zero", title="sparsity of the ISTA output"
        )
    for axis in (left, right):
        axis.set(xlabel=r"layer $\ell$ (0 = first)", xticks=depth)
        axis.legend(handles=[*axis.get_legend_handles_labels()[0], band], fontsize=8)
    images_note = f", {images} images" if images else ""
    figure.suptitle(f"White-box audit per layer{': ' + title if title else ''}{images_note}")
    return figure


def plot_layers(layers: list[dict], path: Path, title: str = "", images: int | None = None) -> Path:
    """``layers_figure`` written to ``path`` (PNG)."""
    return save_figure(layers_figure(layers, title, images), path)


def readout(model: CRATE) -> str:
    """What the head reads: "cls" (the cls token) or "mean" (the mean of all tokens, cls included)."""
    return model.global_pool


@torch.no_grad()
def attention_maps(model: CRATE, images: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """The attention of the tokens the head reads, over the patches, in ``layer``: (B, K, H/P, W/P).
    A cls-pooled model: the cls token's row. A mean-pooled model, whose head reads the mean of all N
    tokens: the rows averaged over all N queries (cls included). Keys: the patches (cls dropped)."""
    states = model.forward_intermediates(
        images, intermediates_only=True, return_layer_states=True, return_attention=True, indices=[layer]
    )
    attention = states[0].attention[..., 1:]  # (B, K, N queries, patch keys)
    attention = attention[:, :, 0] if readout(model) == "cls" else attention.mean(2)
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


def display_image(image: torch.Tensor, mean, std) -> np.ndarray:
    image = image.double().cpu() * torch.tensor(std, dtype=torch.float64)[:, None, None]
    image = (image + torch.tensor(mean, dtype=torch.float64)[:, None, None]).clamp(0, 1)
    return image.permute(1, 2, 0).squeeze(-1).numpy()


ATTENTION_UNITS = "attention weight on a patch (a map's patches sum to at most 1)"


def attention_title(model: CRATE, layer: int) -> str:
    depth = len(model.blocks)
    where = f"layer {layer % depth} of 0..{depth - 1}"
    if readout(model) == "cls":
        return f"Attention of the cls token (the head's readout) over the patches, {where}"
    return f"Attention averaged over all query tokens (the head reads their mean) over the patches, {where}"


def attention_figure(model: CRATE, images: torch.Tensor, layer: int = -1, mean=(0.5,), std=(0.5,)):
    """Per image: the image, each head's readout attention (``attention_maps``) overlaid on one
    colour scale (its bar), the head average, and the PCA of the patch features."""
    plt = pyplot()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    maps = attention_maps(model, images, layer)
    maps = F.interpolate(maps.float(), size=images.shape[-2:], mode="nearest")
    pca = F.interpolate(patch_pca(model, images, layer).float(), size=images.shape[-2:], mode="nearest")
    B, K = maps.shape[:2]
    norm = Normalize(0.0, maps.max().item())
    columns = K + 3
    figure, axes = plt.subplots(
        B, columns, figsize=(1.7 * columns + 1.5, 1.8 * B + 0.9), squeeze=False, layout="constrained"
    )
    for b in range(B):
        picture = display_image(images[b], mean, std)
        panels = (
            [("image", None)]
            + [(f"head {k}", maps[b, k]) for k in range(K)]
            + [("head mean", maps[b].mean(0))]
        )
        for column, (label, overlay) in enumerate(panels):
            axis = axes[b, column]
            axis.imshow(picture, cmap="gray", vmin=0, vmax=1)
            if overlay is not None:
                axis.imshow(overlay.numpy(), cmap="inferno", norm=norm, alpha=0.6)
            axis.set_title(label if b == 0 else "", fontsize=8)
        axes[b, -1].imshow(pca[b].permute(1, 2, 0).numpy())
        axes[b, -1].set_title("PCA (RGB = PC 1-3)" if b == 0 else "", fontsize=8)
        axes[b, 0].set_ylabel(f"image {b}: y (px)", fontsize=7)
    for axis in axes[:, 1:].flat:
        axis.set_xticks([])
        axis.set_yticks([])
    for axis in axes[-1]:
        axis.set_xlabel("x (px)", fontsize=7)
    for axis in axes[:, 0]:
        axis.tick_params(labelsize=6)
    bar = figure.colorbar(ScalarMappable(norm, "inferno"), ax=axes[:, 1 : K + 2], shrink=0.9)
    bar.set_label(ATTENTION_UNITS, fontsize=7)
    figure.suptitle(attention_title(model, layer), fontsize=9)
    return figure


def plot_attention(model: CRATE, images: torch.Tensor, path: Path, layer: int = -1, mean=(0.5,), std=(0.5,)):
    """``attention_figure`` written to ``path`` (PNG)."""
    return save_figure(attention_figure(model, images, layer, mean, std), path)
