"""CRATE-MAE's audit (Pai et al. 2024): the encoder's layers as CRATE's, the decoder's expansion steps
u − MSSA(LN₂ u) read with their own U and with the U of the encoder layer each mirrors; its table,
summary, layer figure and the reconstructions."""

import numpy as np
import torch

import reference

from .figures import band_label, display_image, pyplot
from .measures import (
    EPS,
    coherence,
    compression_fields,
    crate_layer,
    layer_norm64,
    one_thread,
    orthonormality_gap,
    rates,
    stats,
    subspaces,
)
from .tables import pm

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
    y_in, y_out = layer_norm64(state.mssa, block.norm2), layer_norm64(state.ista, block.norm2)
    compression = rates(y_in, y_out, U, eps)
    U_mirror = subspaces(mirror)
    mirror_in = reference.compression_rate(y_in, U_mirror, eps, normalize=True)
    mirror_out = reference.compression_rate(y_out, U_mirror, eps, normalize=True)
    with one_thread(U.device):
        gap, cross = orthonormality_gap(U), coherence(U)
    return dict(
        layer=layer,
        **compression_fields(compression),
        mirror_compression_in=stats(mirror_in),
        mirror_compression_out=stats(mirror_out),
        orthonormality_gap=gap,
        head_coherence=cross,
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
            crate_layer(layer, state, block, eps)
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
            nonzero = pm(r["nonzero"], 3) if "nonzero" in r else "–"
            mirror = (
                f"{r['mirror_compression_in']['mean']:.2f} → {r['mirror_compression_out']['mean']:.2f}"
                if "mirror_compression_in" in r
                else "–"
            )
            rows.append(
                f"| {part} ({label}) | {r['layer']} | {pm(r['compression_in'])} | "
                f"{pm(r['compression_out'])} | {r['compression_change']['mean']:+.2f} | "
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
    plt = pyplot()
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
    plt = pyplot()
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
        original = display_image(images[b], mean, std)
        panels = (
            _masked_display(original, masking.mask[b], patch, grid),
            display_image(reconstruction[b], mean, std),
            display_image(prediction[b], mean, std),
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
