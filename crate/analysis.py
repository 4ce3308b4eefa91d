"""White-box audit of a CRATE or CRATE-α model: does each layer do what the paper says it does?

For a batch of images, per layer ℓ, all in float64 (docs/math.md §7). Both families:
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

Pictures: the per-layer figure of the paper (compression and sparsity against depth, with spread:
the ISTA output's for CRATE, the codes' for CRATE-α), the attention per head over the image of the
tokens the head reads (the cls token, or all tokens averaged for a mean-pooled model), and the PCA
of the patch features (first three components as RGB), as in "Emergence of Segmentation with
Minimalistic White-Box Transformers".
"""

import contextlib
import copy
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import reference

from .models import CRATE
from .models.alpha import AlphaBlock

EPS = 0.1


def _layer_norm64(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x.double(), norm.normalized_shape, norm.weight.double(), norm.bias.double(), norm.eps)


def subspaces(block) -> torch.Tensor:
    """U of a layer, (K, d, p) float64: U_k = (rows k·p..(k+1)·p−1 of the qkv weight)ᵀ."""
    return block.attn.qkv.weight.double().unflatten(0, (block.attn.heads, -1)).transpose(-2, -1)


def _orthonormality_gap(U: torch.Tensor) -> float:
    eye = torch.eye(U.shape[-1], dtype=U.dtype, device=U.device)
    return torch.linalg.matrix_norm(U.transpose(-1, -2) @ U - eye, ord=2).max().item()


def _coherence(U: torch.Tensor) -> float:
    K = U.shape[0]
    if K < 2:
        return 0.0
    norms = torch.linalg.matrix_norm(U, ord=2)
    cross = torch.linalg.matrix_norm(U[:, None].transpose(-1, -2) @ U[None], ord=2) / (
        norms[:, None] * norms[None]
    )
    return cross[~torch.eye(K, dtype=torch.bool, device=U.device)].max().item()


@contextlib.contextmanager
def _one_thread(device: torch.device):
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


def _stats(values: torch.Tensor) -> dict:
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
        (_alpha_layer if isinstance(block, AlphaBlock) else _crate_layer)(layer, state, block, eps)
        for layer, (state, block) in enumerate(zip(states, model.blocks, strict=True))
    ]


def _compression(state, block, eps: float) -> tuple[torch.Tensor, dict]:
    """(U, per-image R^c of the MSSA step's input and output, normalised and raw)."""
    U = subspaces(block)
    y_in, y_out = _layer_norm64(state.input, block.norm1), _layer_norm64(state.mssa, block.norm1)
    return U, _rates(y_in, y_out, U, eps)


def _rates(y_in: torch.Tensor, y_out: torch.Tensor, U: torch.Tensor, eps: float) -> dict:
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


def _compression_fields(compression: dict) -> dict:
    return dict(
        compression_in=_stats(compression["in"]),
        compression_out=_stats(compression["out"]),
        compression_change=_stats(compression["out"] - compression["in"]),
        raw_compression_in=_stats(compression["raw_in"]),
        raw_compression_out=_stats(compression["raw_out"]),
    )


def _crate_layer(layer: int, state, block, eps: float) -> dict:
    U, compression = _compression(state, block, eps)
    D = block.ista.weight.double()
    u = _layer_norm64(state.mssa, block.norm2)
    output = state.ista.double()
    eta, lam = block.ista.eta, block.ista.lam
    lasso_start = reference.lasso_data_term(u, u, D) + lam * u.abs().sum((-2, -1))
    lasso_end = reference.lasso_objective(output, u, D, lam)
    with _one_thread(D.device):
        eta_lipschitz = eta * torch.linalg.matrix_norm(D, ord=2).item() ** 2
        gap, coherence = _orthonormality_gap(U), _coherence(U)
    return dict(
        layer=layer,
        **_compression_fields(compression),
        nonzero=_stats((state.ista != 0).double().mean((-2, -1))),
        eta_lipschitz=eta_lipschitz,
        lasso_start=_stats(lasso_start),
        lasso_end=_stats(lasso_end),
        orthonormality_gap=gap,
        head_coherence=coherence,
    )


def alpha_codes(block: AlphaBlock, z_half: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u, a₁, a₂) in float64 for a CRATE-α layer whose stream after MSSA is ``z_half``: u = LN₂(z_half),
    and the codes of the layer's own ``odl.codes`` run on a float64 copy of the block (D, D₁, η, λ)."""
    odl = copy.deepcopy(block.odl).double()
    u = _layer_norm64(z_half, block.norm2)
    a1, a2 = odl.codes(u)
    return u, a1, a2


def _alpha_layer(layer: int, state, block: AlphaBlock, eps: float) -> dict:
    U, compression = _compression(state, block, eps)
    D, D1 = block.odl.D.double(), block.odl.D1.double()
    eta, lam = block.odl.eta, block.odl.lam
    u, a1, a2 = alpha_codes(block, state.mssa)
    with _one_thread(D.device):
        eta_lipschitz = eta * _spectral_norm_squared(D)
        gap, coherence = _orthonormality_gap(U), _coherence(U)
    return dict(
        layer=layer,
        **_compression_fields(compression),
        nonzero_a1=_stats((a1 != 0).double().mean((-2, -1))),
        nonzero_a2=_stats((a2 != 0).double().mean((-2, -1))),
        eta_lipschitz=eta_lipschitz,
        lasso_start=_stats(reference.lasso_objective(torch.zeros_like(a1), u, D, lam)),
        lasso_step1=_stats(reference.lasso_objective(a1, u, D, lam)),
        lasso_step2=_stats(reference.lasso_objective(a2, u, D, lam)),
        decoder_drift=((D1 - D).norm() / D.norm()).item(),  # Frobenius
        orthonormality_gap=gap,
        head_coherence=coherence,
    )


def _spectral_norm_squared(D: torch.Tensor) -> float:
    """‖D‖₂² = the largest eigenvalue of the smaller Gram, DDᵀ (d × d) for CRATE-α's d × 4d D: an
    eigenvalue problem of size d, where matrix_norm(ord=2) takes the SVD of the wide D."""
    gram = D @ D.T if D.shape[0] <= D.shape[1] else D.T @ D
    return torch.linalg.eigvalsh(gram)[-1].item()


def is_alpha(layers: list[dict]) -> bool:
    """Whether audit rows are CRATE-α's (ODL fields) rather than CRATE's (ISTA fields)."""
    return bool(layers) and "nonzero_a2" in layers[0]


def _pm(entry: dict, digits: int = 2) -> str:
    return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"


def markdown_table(layers: list[dict]) -> str:
    if is_alpha(layers):
        return _alpha_markdown_table(layers)
    header = (
        "| layer | R^c in | R^c after MSSA | change | raw R^c in → out | non-zero | η‖D‖² "
        "| LASSO start → end | ‖UᵀU − I‖ | coherence |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [
        f"| {r['layer']} | {_pm(r['compression_in'])} | {_pm(r['compression_out'])} | "
        f"{r['compression_change']['mean']:+.2f} | {r['raw_compression_in']['mean']:.1f} → "
        f"{r['raw_compression_out']['mean']:.1f} | {_pm(r['nonzero'], 3)} | {r['eta_lipschitz']:.3f} | "
        f"{r['lasso_start']['mean']:.1f} → {r['lasso_end']['mean']:.1f} | {r['orthonormality_gap']:.2f} | "
        f"{r['head_coherence']:.2f} |"
        for r in layers
    ]
    return "\n".join([header, *rows])


ALPHA_LEGEND = (
    "non-zero a₁, a₂: fraction of the m = 4d codes that are non-zero after the ODL block's first and "
    "second step (the output stream is not sparse: it adds D₁a₂ to Z^{ℓ+½}). LASSO: f(a) = ½‖u − Da‖² + "
    "λ‖a‖₁ + 𝟙{a ≥ 0}, u = LN₂(Z^{ℓ+½}), per image (summed over tokens), at a = 0, a₁, a₂; it cannot "
    "increase while η‖D‖₂² ≤ 2. ‖D₁ − D‖/‖D‖: the decoder's distance from the encoder (Frobenius)."
)


def _alpha_markdown_table(layers: list[dict]) -> str:
    header = (
        "| layer | R^c in | R^c after MSSA | change | raw R^c in → out | non-zero a₁ | non-zero a₂ | η‖D‖² "
        "| LASSO f(0) → f(a₁) → f(a₂) | ‖D₁ − D‖/‖D‖ | ‖UᵀU − I‖ | coherence |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [
        f"| {r['layer']} | {_pm(r['compression_in'])} | {_pm(r['compression_out'])} | "
        f"{r['compression_change']['mean']:+.2f} | {r['raw_compression_in']['mean']:.1f} → "
        f"{r['raw_compression_out']['mean']:.1f} | {_pm(r['nonzero_a1'], 3)} | {_pm(r['nonzero_a2'], 3)} | "
        f"{r['eta_lipschitz']:.3f} | {r['lasso_start']['mean']:.1f} → {r['lasso_step1']['mean']:.1f} → "
        f"{r['lasso_step2']['mean']:.1f} | {r['decoder_drift']:.3f} | {r['orthonormality_gap']:.2f} | "
        f"{r['head_coherence']:.2f} |"
        for r in layers
    ]
    return "\n".join([header, *rows])


def format_table(summary: list[dict]) -> str:
    """The console table: compression before/after each MSSA step and the sparsity (CRATE: of the
    ISTA output; CRATE-α: of the codes a₂, with the LASSO before and after the ODL block)."""

    def stat(entry: dict) -> str:
        return f"{entry['mean']:9.3f} ± {entry['std']:7.3f}"

    if is_alpha(summary):
        header = (
            f"{'layer':>5} | {'R^c in (LN1 Z^l)':>19} | {'R^c after MSSA':>19} | "
            f"{'change':>8} | {'non-zero codes a2':>19} | {'LASSO f(0) -> f(a2)':>21}"
        )
        lines = [header, "-" * len(header)]
        for row in summary:
            lasso = f"{row['lasso_start']['mean']:.1f} -> {row['lasso_step2']['mean']:.1f}"
            lines.append(
                f"{row['layer']:>5} | {stat(row['compression_in'])} | {stat(row['compression_out'])} | "
                f"{row['compression_change']['mean']:+8.3f} | {stat(row['nonzero_a2'])} | {lasso:>21}"
            )
        return "\n".join(lines)
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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def band_label(images: int | None) -> str:
    """The legend entry of the shaded bands: what their width is."""
    return f"shaded: mean ± 1 s.d. over the {f'{images} ' if images else ''}images"


def layers_figure(layers: list[dict], title: str = "", images: int | None = None):
    """The paper's layer-wise figure: compression (before/after MSSA) and sparsity against depth
    (CRATE: of the ISTA output Z^{ℓ+1}; CRATE-α: of the ODL codes a₂, and a₁ dashed), the lines the
    batch means, the bands one standard deviation over its images. Labels in mathtext ($...$)."""
    plt = _pyplot()
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
    figure = layers_figure(layers, title, images)
    figure.savefig(path, dpi=120)
    _pyplot().close(figure)
    return path


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


def _display(image: torch.Tensor, mean, std) -> np.ndarray:
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
    plt = _pyplot()
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
        picture = _display(images[b], mean, std)
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
    figure = attention_figure(model, images, layer, mean, std)
    figure.savefig(path, dpi=120)
    _pyplot().close(figure)
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
    legend = f"\n{ALPHA_LEGEND}\n" if is_alpha(layers) else ""
    paths["markdown"].write_text(
        f"# White-box audit{': ' + title if title else ''}\n\n{markdown_table(layers)}\n{legend}"
    )
    paths["layers"] = plot_layers(layers, output / "layers.png", title, len(images))
    paths["attention"] = plot_attention(
        model, images[:attention_images], output / "attention.png", layer=layer, mean=mean, std=std
    )
    return paths


# -- CRATE-MAE: the encoder and the decoder (Pai et al. 2024) ------------------------------------------
MAE_AUDIT_NOTE = (
    "Encoder layer ℓ: R^c of LN₁(Z^ℓ) and of LN₁(Z^{ℓ+½}) after its MSSA step (a descent step on R^c), "
    "the sparsity of its ISTA output Z^{ℓ+1}. Decoder layer ℓ: u = LN₁(Z)·Wᵀ, then Z' = u − MSSA(LN₂(u)), "
    "claimed an ascent step on R^c: R^c of LN₂(u) and of LN₂(Z'), both with the layer's own U (its MSSA's "
    "qkv weight), and with the U of the encoder layer it mirrors (L − 1 − ℓ; dotted in the plot); normalised "
    "head-tokens, ε = 0.1, per image."
)


def _decoder_layer(layer: int, state, block, mirror, eps: float) -> dict:
    """A decoder layer's compression before and after its expansion step u − MSSA(LN₂ u), read by its
    own MSSA's U through LN₂ (what that MSSA sees), the same two states read with the U of ``mirror``
    (the encoder layer it undoes: encoder layer L − 1 − ℓ), and the geometry of its U."""
    U = subspaces(block)
    y_in, y_out = _layer_norm64(state.mssa, block.norm2), _layer_norm64(state.ista, block.norm2)
    compression = _rates(y_in, y_out, U, eps)
    U_mirror = subspaces(mirror)
    mirror_in = reference.compression_rate(y_in, U_mirror, eps, normalize=True)
    mirror_out = reference.compression_rate(y_out, U_mirror, eps, normalize=True)
    with _one_thread(U.device):
        gap, coherence = _orthonormality_gap(U), _coherence(U)
    return dict(
        layer=layer,
        **_compression_fields(compression),
        mirror_compression_in=_stats(mirror_in),
        mirror_compression_out=_stats(mirror_out),
        orthonormality_gap=gap,
        head_coherence=coherence,
    )


@torch.no_grad()
def mae_audit(model, images: torch.Tensor, masking=None, eps: float = EPS) -> dict:
    """{"encoder": one ``audit`` row per encoder layer (compression around MSSA, ISTA sparsity, LASSO),
    "decoder": one row per decoder layer (compression before and after its expansion step)} of a
    CRATEMAE on ``images``, their patches masked by ``masking`` (None: every patch seen)."""
    was_training = model.training
    model.eval()
    encoder, decoder = model.layer_states(images, masking)
    model.train(was_training)
    return dict(
        encoder=[
            _crate_layer(layer, state, block, eps)
            for layer, (state, block) in enumerate(zip(encoder, model.blocks, strict=True))
        ],
        decoder=[
            _decoder_layer(layer, state, block, mirror, eps)
            for layer, (state, block, mirror) in enumerate(
                zip(decoder, model.decoder_blocks, reversed(model.blocks), strict=True)
            )
        ],
    )


def _trend(rows: list[dict], key: str) -> float:
    """Last layer's mean minus the first's: how R^c moved across the layers."""
    return rows[-1][key]["mean"] - rows[0][key]["mean"]


def mae_markdown_table(result: dict) -> str:
    """One row per layer, encoder then decoder: R^c before and after the layer's attention step, the
    change, raw R^c, the encoder's ISTA sparsity, the geometry of U."""
    header = (
        "| part | layer | R^c before | R^c after | change | raw R^c before → after | non-zero (ISTA out) "
        "| R^c with the mirror encoder layer's U, before → after | ‖UᵀU − I‖ | coherence |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = []
    for part, label in (("encoder", "before / after MSSA"), ("decoder", "before / after expansion")):
        for r in result[part]:
            nonzero = _pm(r["nonzero"], 3) if "nonzero" in r else "–"
            mirror = (
                f"{r['mirror_compression_in']['mean']:.2f} → {r['mirror_compression_out']['mean']:.2f}"
                if "mirror_compression_in" in r
                else "–"
            )
            rows.append(
                f"| {part} ({label}) | {r['layer']} | {_pm(r['compression_in'])} | "
                f"{_pm(r['compression_out'])} | {r['compression_change']['mean']:+.2f} | "
                f"{r['raw_compression_in']['mean']:.1f} → {r['raw_compression_out']['mean']:.1f} | "
                f"{nonzero} | {mirror} | "
                f"{r['orthonormality_gap']:.2f} | {r['head_coherence']:.2f} |"
            )
    return "\n".join([header, *rows])


def mae_summary_lines(result: dict) -> str:
    """The measured answers: per-step changes (how many layers' steps lowered/raised R^c) and the
    trend across layers, for encoder and decoder."""
    lines = []
    for part, step in (("encoder", "MSSA"), ("decoder", "expansion")):
        rows = result[part]
        lowered = sum(r["compression_change"]["mean"] < 0 for r in rows)
        lines.append(
            f"- {part}: the {step} step lowered R^c in {lowered} of {len(rows)} layers, raised it in "
            f"{len(rows) - lowered}; across the layers R^c (before the step) moved "
            f"{_trend(rows, 'compression_in'):+.2f} from layer 0 to layer {len(rows) - 1}"
        )
    rows = result["decoder"]
    raised = sum(r["mirror_compression_out"]["mean"] > r["mirror_compression_in"]["mean"] for r in rows)
    lines.append(
        f"- decoder read with the mirror encoder layer's U: the expansion step raised R^c in {raised} of "
        f"{len(rows)} layers; R^c (before the step) moved {_trend(rows, 'mirror_compression_in'):+.2f} "
        f"from decoder layer 0 to {len(rows) - 1}"
    )
    return "\n".join(lines)


def mae_layers_figure(result: dict, title: str = "", images: int | None = None):
    """R^c per layer across the encoder then the decoder (before and after each layer's attention step),
    and the sparsity of the encoder's ISTA outputs; lines the means, bands ±1 s.d. over the images."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    rows = result["encoder"] + result["decoder"]
    depth_e = len(result["encoder"])
    x = np.arange(len(rows))
    figure, (left, right) = plt.subplots(
        1, 2, figsize=(12, 4.4), layout="constrained", gridspec_kw=dict(width_ratios=[2, 1])
    )
    for key, label, color in (
        ("compression_in", r"before (enc: $\mathrm{LN}_1(Z^\ell)$; dec: $\mathrm{LN}_2(u)$)", "tab:blue"),
        ("compression_out", r"after it (enc: MSSA; dec: $u - \mathrm{MSSA}$)", "tab:orange"),
    ):
        mean = np.array([r[key]["mean"] for r in rows])
        std = np.array([r[key]["std"] for r in rows])
        left.plot(x, mean, "o-", color=color, label=label)
        left.fill_between(x, mean - std, mean + std, color=color, alpha=0.2)
    decoder_x = x[depth_e:]
    for key, color in (("mirror_compression_in", "tab:blue"), ("mirror_compression_out", "tab:orange")):
        mean = np.array([r[key]["mean"] for r in result["decoder"]])
        left.plot(decoder_x, mean, "s:", color=color, alpha=0.7)
    left.plot([], [], "s:", color="gray", label="decoder read with the mirror encoder layer's $U$")
    left.axvline(depth_e - 0.5, color="gray", linestyle="--")
    left.text(depth_e - 0.6, 1.0, "encoder ", ha="right", va="top", transform=left.get_xaxis_transform())
    left.text(depth_e - 0.4, 1.0, " decoder", ha="left", va="top", transform=left.get_xaxis_transform())
    left.set(
        xticks=x,
        xticklabels=[f"E{r['layer']}" for r in result["encoder"]]
        + [f"D{r['layer']}" for r in result["decoder"]],
        xlabel="layer (E: encoder, D: decoder, in the order the data flows)",
        ylabel=r"$R^c$ per image (nats; unit head-tokens, $\epsilon$ = 0.1)",
        title=r"compression $R^c$ with each layer's own $U$ (lower: more compressed)",
    )
    band = Patch(facecolor="gray", alpha=0.3, label=band_label(images))
    left.legend(handles=[*left.get_legend_handles_labels()[0], band], fontsize=8)
    depth = np.arange(depth_e)
    mean = np.array([r["nonzero"]["mean"] for r in result["encoder"]])
    std = np.array([r["nonzero"]["std"] for r in result["encoder"]])
    right.plot(depth, mean, "o-", color="tab:green", label=r"ISTA output $Z^{\ell+1}$")
    right.fill_between(depth, mean - std, mean + std, color="tab:green", alpha=0.2)
    right.set(
        xticks=depth,
        xlabel=r"encoder layer $\ell$",
        ylabel=r"fraction of the $N \times d$ entries non-zero",
        title="sparsity of the encoder's ISTA outputs",
        ylim=(0, 1.05),
    )
    right.legend(fontsize=8)
    images_note = f", {images} images" if images else ""
    figure.suptitle(f"CRATE-MAE white-box audit{': ' + title if title else ''}{images_note}")
    return figure


def _masked_display(image: np.ndarray, mask: torch.Tensor, patch: int, grid: tuple[int, int]) -> np.ndarray:
    """The image with its masked patches filled with mid-grey (the background is black)."""
    shown = image.copy()
    for index in mask.nonzero().flatten().tolist():
        row, column = divmod(index, grid[1])
        shown[row * patch : (row + 1) * patch, column * patch : (column + 1) * patch] = 0.5
    return shown


@torch.no_grad()
def reconstruction_figure(model, images: torch.Tensor, masking, mean=(0.5,), std=(0.5,)):
    """Columns: the test images; rows: the masked input (masked patches mid-grey), the reconstruction
    (the visible patches pasted, ``CRATEMAE.reconstruct``), the decoder's prediction of every patch,
    and the original. Each reconstruction is titled with its error on the masked patches."""
    plt = _pyplot()
    was_training = model.training
    model.eval()
    latent = model.encode(model.embed(images, masking))
    pred = model.forward_decoder(latent)
    model.train(was_training)
    reconstruction = model.reconstruct(images, pred, masking.mask)
    prediction = model.unpatchify(pred.to(images.dtype))
    per_patch = ((pred.float() - model.patchify(images).float()) ** 2).mean(-1)  # (B, L), normalised pixels
    masked_mse = (per_patch * masking.mask).sum(1) / masking.mask.sum(1)
    B, patch, grid = len(images), model.config.patch_size, model.patch_embed.grid_size
    labels = ("masked input", "reconstruction\n(visible pasted)", "prediction\n(every patch)", "original")
    figure, axes = plt.subplots(4, B, figsize=(1.45 * B + 1.2, 6.6), squeeze=False, layout="constrained")
    for b in range(B):
        original = _display(images[b], mean, std)
        panels = (
            _masked_display(original, masking.mask[b], patch, grid),
            _display(reconstruction[b], mean, std),
            _display(prediction[b], mean, std),
            original,
        )
        for row, panel in enumerate(panels):
            axes[row, b].imshow(panel, cmap="gray", vmin=0, vmax=1)
            axes[row, b].set_xticks([])
            axes[row, b].set_yticks([])
        axes[1, b].set_title(f"MSE {masked_mse[b].item():.2f}", fontsize=7)
    for row, label in enumerate(labels):
        axes[row, 0].set_ylabel(label, fontsize=8)
    masked = int(masking.mask[0].sum().item())
    figure.suptitle(
        f"CRATE-MAE on test images: {masked} of the {masking.mask.shape[1]} {patch}×{patch} patches masked "
        "(MSE: on the masked patches, normalised pixels)",
        fontsize=9,
    )
    return figure


def _save(figure, path: Path) -> Path:
    figure.savefig(path, dpi=120)
    _pyplot().close(figure)
    return path


def write_mae_report(
    model,
    images: torch.Tensor,
    output: Path,
    title: str = "",
    mean=(0.5,),
    std=(0.5,),
    mask_ratio: float | None = None,
    seed: int = 0,
    figure_images: int = 8,
) -> dict[str, Path]:
    """audit.json, audit.md, layers.png (``mae_layers_figure``) and reconstructions.png of a CRATEMAE in
    ``output``; the masking drawn from a generator seeded with ``seed`` at ``mask_ratio`` (None: the
    model's training ratio), the same masking for the audit and the figure."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    noise = torch.rand(len(images), model.num_patches, generator=torch.Generator().manual_seed(seed))
    masking = model.random_masking(images, mask_ratio, noise.to(images.device))
    result = mae_audit(model, images, masking)
    ratio = masking.mask.float().mean().item()
    paths = dict(json=output / "audit.json", markdown=output / "audit.md")
    paths["json"].write_text(
        json.dumps(dict(title=title, eps=EPS, images=len(images), mask_ratio=ratio, **result), indent=2)
    )
    paths["markdown"].write_text(
        f"# CRATE-MAE white-box audit{': ' + title if title else ''}\n\n"
        f"{len(images)} test images, {int(masking.mask[0].sum())} of their {model.num_patches} patches "
        "masked (the training task). "
        f"{MAE_AUDIT_NOTE}\n\n{mae_markdown_table(result)}\n\n{mae_summary_lines(result)}\n"
    )
    paths["layers"] = _save(mae_layers_figure(result, title, len(images)), output / "layers.png")
    figure_masking = type(masking)(*(field[:figure_images] for field in masking))
    paths["reconstructions"] = _save(
        reconstruction_figure(model, images[:figure_images], figure_masking, mean, std),
        output / "reconstructions.png",
    )
    return paths
