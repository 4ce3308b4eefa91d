"""The audit written to a folder: JSON, Markdown and the figures, for CRATE and CRATE-α (write_report,
`crate audit` and the demo) and for CRATE-MAE (write_mae_report, the MAE demo)."""

import json
from pathlib import Path

import torch

from ..models import CRATE
from .figures import plot_attention, plot_layers, save_figure
from .mae import (
    MAE_AUDIT_NOTE,
    mae_audit,
    mae_layers_figure,
    mae_markdown_table,
    mae_summary_lines,
    reconstruction_figure,
)
from .measures import EPS, audit
from .tables import ALPHA_LEGEND, is_alpha, markdown_table


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
    paths["layers"] = save_figure(mae_layers_figure(result, title, len(images)), output / "layers.png")
    figure_masking = type(masking)(*(field[:figure_images] for field in masking))
    paths["reconstructions"] = save_figure(
        reconstruction_figure(model, images[:figure_images], figure_masking, mean, std),
        output / "reconstructions.png",
    )
    return paths
