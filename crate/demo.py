"""`make demo`: train the small CRATE on the full Fashion-MNIST on the CPU, then report its test
accuracy, the wall time and the per-layer white-box table (compression before and after each MSSA
step, sparsity after each ISTA step; crate.whitebox).

    python -m crate.demo                              # crate_mini_patch4_28, the fashion-mnist preset
    python -m crate.demo --model vit_mini_patch4_28   # the same recipe on a ViT of the same size
"""

import argparse
import json
import time
from pathlib import Path

from . import whitebox
from .train import resolve_config, train


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="crate_mini_patch4_28")
    parser.add_argument("--output", default=None, help="run folder (default runs/demo-<model>)")
    args, overrides = parser.parse_known_args(argv)
    output = args.output or f"runs/demo-{args.model}"
    config = resolve_config(
        ["--preset", "fashion-mnist", "--model", args.model, "--output", output, *overrides]
    )
    start = time.perf_counter()
    result = train(config)
    wall = time.perf_counter() - start
    print(
        f"\n{args.model} on Fashion-MNIST ({result['eval_images']} test images): "
        f"top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}%, {config.epochs} epochs in {wall:.0f} s"
    )
    if "whitebox" in result:
        print("\nPer-layer white-box measurements on 64 test images (mean ± std over images):")
        print(whitebox.format_table(result["whitebox"]))
    summary = dict(
        model=args.model, top1=result["top1"], top5=result["top5"], wall_s=wall, epochs=config.epochs
    )
    Path(output, "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nrun folder: {output} (config.json, metrics.jsonl, checkpoints, summary.json)")
    return result


if __name__ == "__main__":
    main()
