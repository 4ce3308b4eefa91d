"""The white-box audit of a CRATE, CRATE-α or CRATE-MAE model: does each layer do what the paper says
it does?

measures.py computes the per-layer quantities in float64 (compression R^c around each MSSA step, the
geometry of U, the sparsity and LASSO of the ISTA or ODL step), tables.py and figures.py show them
(with the attention maps and the patch PCA), mae.py audits CRATE-MAE's encoder and decoder, and
report.py writes any of them to a folder."""

from .figures import (
    ATTENTION_UNITS,
    attention_figure,
    attention_maps,
    attention_title,
    band_label,
    layers_figure,
    patch_pca,
    plot_attention,
    plot_layers,
)
from .mae import mae_audit, mae_layers_figure, mae_markdown_table, mae_summary_lines, reconstruction_figure
from .measures import EPS, alpha_codes, audit, coherence, orthonormality_gap, subspaces
from .report import write_mae_report, write_report
from .tables import ALPHA_LEGEND, format_table, is_alpha, markdown_table

__all__ = [
    "ALPHA_LEGEND",
    "ATTENTION_UNITS",
    "EPS",
    "alpha_codes",
    "attention_figure",
    "attention_maps",
    "attention_title",
    "audit",
    "band_label",
    "coherence",
    "format_table",
    "is_alpha",
    "layers_figure",
    "mae_audit",
    "mae_layers_figure",
    "mae_markdown_table",
    "mae_summary_lines",
    "markdown_table",
    "orthonormality_gap",
    "patch_pca",
    "plot_attention",
    "plot_layers",
    "reconstruction_figure",
    "subspaces",
    "write_mae_report",
    "write_report",
]
