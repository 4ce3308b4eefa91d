"""`make demo`: build a small random CRATE, run the float64 reference on it and print the per-layer
white-box table (compression before and after each MSSA step, sparsity after each ISTA step).

Compression is the normalised-token R^c of math.md §7 (ε = 0.1, the official tool's convention),
measured with each layer's own LN₁ and subspaces U^ℓ; sparsity is the fraction of non-zero entries.
"""

import argparse
import time

import torch

from reference import OfficialCRATE, compression_rate, random_official_state_dict


def layer_measurements(model: OfficialCRATE, images: torch.Tensor, eps: float = 0.1) -> list[dict]:
    """Per layer ℓ and per image: R̂^c(LN₁(Z^ℓ)), R̂^c(LN₁(Z^{ℓ+½})) and ‖Z^{ℓ+1}‖₀/(N·d)."""
    rows = []
    with torch.no_grad():
        states = model.forward_intermediates(images)
        for layer, (state, (mssa, _)) in enumerate(zip(states, model.transformer.layers, strict=True)):
            U = mssa.fn.subspaces()
            rows.append(
                dict(
                    layer=layer,
                    compression_in=compression_rate(mssa.norm(state.input), U, eps, normalize=True),
                    compression_out=compression_rate(mssa.norm(state.mssa), U, eps, normalize=True),
                    nonzero=(state.ista != 0).double().mean((-2, -1)),
                )
            )
    return rows


def format_table(rows: list[dict]) -> str:
    def stat(values: torch.Tensor) -> str:
        return (
            f"{values.mean():9.3f} ± {values.std():7.3f}" if values.numel() > 1 else f"{values.item():9.3f}"
        )

    lines = [
        f"{'layer':>5} | {'R^c in (LN1 Z^l)':>19} | {'R^c after MSSA':>19} | "
        f"{'change':>8} | {'non-zero':>17}",
        "-" * 82,
    ]
    for row in rows:
        change = row["compression_out"] - row["compression_in"]
        lines.append(
            f"{row['layer']:>5} | {stat(row['compression_in'])} | {stat(row['compression_out'])} | "
            f"{change.mean():+8.3f} | {stat(row['nonzero'])}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    generator = torch.Generator().manual_seed(args.seed)
    sizes = dict(
        dim=args.dim,
        depth=args.depth,
        heads=args.heads,
        head_dim=args.dim // args.heads,
        patch_size=7,
        channels=1,
        num_patches=16,
        num_classes=10,
    )
    model = OfficialCRATE.from_state_dict(
        random_official_state_dict(**sizes, generator=generator), heads=args.heads, patch_size=7, channels=1
    )
    images = torch.randn(args.batch, 1, 28, 28, dtype=torch.float64, generator=generator)
    start = time.perf_counter()
    rows = layer_measurements(model, images)
    print(
        f"Random CRATE (d={args.dim}, depth={args.depth}, heads={args.heads}, 28×28 grayscale, patch 7), "
        f"float64 reference, {args.batch} random images; mean ± std over images"
    )
    print(format_table(rows))
    print(
        f"({time.perf_counter() - start:.2f} s) An untrained model: these numbers are a baseline, "
        "not evidence of compression or sparsification."
    )


if __name__ == "__main__":
    main()
