"""The audit's rows as tables: Markdown (audit.md, the README) and the console's."""


def is_alpha(layers: list[dict]) -> bool:
    """Whether audit rows are CRATE-α's (ODL fields) rather than CRATE's (ISTA fields)."""
    return bool(layers) and "nonzero_a2" in layers[0]


def pm(entry: dict, digits: int = 2) -> str:
    return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"


def markdown_table(layers: list[dict]) -> str:
    if is_alpha(layers):
        return _alpha_markdown_table(layers)
    header = (
        "| layer | R^c in | R^c after MSSA | change | raw R^c in → out | non-zero | η‖D‖² "
        "| LASSO start → end | ‖UᵀU − I‖ | coherence |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [
        f"| {r['layer']} | {pm(r['compression_in'])} | {pm(r['compression_out'])} | "
        f"{r['compression_change']['mean']:+.2f} | {r['raw_compression_in']['mean']:.1f} → "
        f"{r['raw_compression_out']['mean']:.1f} | {pm(r['nonzero'], 3)} | {r['eta_lipschitz']:.3f} | "
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
        f"| {r['layer']} | {pm(r['compression_in'])} | {pm(r['compression_out'])} | "
        f"{r['compression_change']['mean']:+.2f} | {r['raw_compression_in']['mean']:.1f} → "
        f"{r['raw_compression_out']['mean']:.1f} | {pm(r['nonzero_a1'], 3)} | {pm(r['nonzero_a2'], 3)} | "
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
