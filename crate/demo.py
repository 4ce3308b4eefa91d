"""`make demo`: train the small CRATE on the full Fashion-MNIST on the CPU, then report its test
accuracy, the wall time and the per-layer white-box table (compression before and after each MSSA
step, sparsity after each ISTA step; for CRATE-α the sparsity of the ODL codes and the LASSO before
and after the block), and write the audit (crate.analysis: JSON, Markdown, the layer-wise plot and
the attention maps) into the run folder.

    python -m crate.demo                                      # crate_mini_patch7_28, the fashion-mnist preset
    python -m crate.demo --no-amp                             # the same in float32 on any CPU
    python -m crate.demo --model crate_alpha_mini_patch4_28   # the recipe on CRATE-α (4×4 patches)
    python -m crate.demo --model vit_mini_patch4_28           # ... and on a ViT of their width and depth

It prints first the precision it trains in and its estimated training time on this machine.

Any other option goes to `crate train` (e.g. ``--epochs 1 --train-subset 512`` for a quick look).
"""

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

from . import analysis, errors
from .audit import load_images, load_model
from .runtime import autocast, default_device, keep_freed_memory, uses_bf16
from .train import TrainConfig, build_model, resolve_config, train
from .train.setup import dataset_classes, make_loss, open_datasets, planned_steps


@errors.command("python -m crate.demo")
def main(argv: list[str] | None = None) -> dict:
    parser = errors.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=TrainConfig.model)
    parser.add_argument("--output", default=None, help="run folder (default runs/demo-<model>)")
    parser.add_argument("--retrain", action="store_true", help="train again even if the run is complete")
    args, overrides = parser.parse_known_args(argv)
    output = Path(args.output or f"runs/demo-{args.model}")
    config = resolve_config(
        ["--preset", "fashion-mnist", "--model", args.model, "--output", str(output), *overrides]
    )
    summary = _completed_run(output, config)
    if summary is None or args.retrain:
        if output.exists():
            shutil.rmtree(output)
        device = default_device()
        print(_plan(config, device))
        start = time.perf_counter()
        result = train(config)
        summary = dict(
            model=args.model,
            epochs=config.epochs,
            precision="bfloat16" if uses_bf16(device, config.amp) else "float32",
            wall_s=time.perf_counter() - start,
            verification=_verification(output),
            result=result,
        )
        (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    else:
        print(f"{output} holds a completed run with this configuration (--retrain to train again)")
    _report(summary, output)
    if args.model.startswith("crate"):
        model, _ = load_model(output)
        images = load_images(model, "fashion-mnist", None, "test", 64)
        paths = analysis.write_report(
            model,
            images,
            output / "audit",
            title=f"{args.model}, Fashion-MNIST",
            mean=model.pretrained_cfg["mean"],
            std=model.pretrained_cfg["std"],
        )
        print(
            "\nWhite-box audit (crate audit):\n"
            + "\n".join(f"  {kind}: {path}" for kind, path in paths.items())
        )
    return summary["result"]


def _plan(config: TrainConfig, device: torch.device) -> str:
    """What the run will compute in, and how long it should take here."""
    if uses_bf16(device, config.amp) and device.type == "cuda":
        precision = "bf16 autocast on the GPU (--no-amp for float32)"
    elif uses_bf16(device, config.amp):
        precision = "bf16 autocast (this CPU has native bf16 instructions; --no-amp for float32)"
    elif config.amp:
        precision = "float32 (this CPU has no native bf16 instructions, where bf16 would be slower)"
    else:
        precision = "float32 (--no-amp)"
    seconds, steps, step_s = estimate_training_seconds(config, device)
    return (
        f"Precision: {precision}\n"
        f"Estimated training time on this machine: {seconds // 60:.0f} min {seconds % 60:.0f} s "
        f"({steps} steps of {config.batch_size} images at {1 / step_s:.1f} steps/s, and the evaluations)"
    )


def estimate_training_seconds(
    config: TrainConfig, device: torch.device, timed_steps: int = 5
) -> tuple[float, int, float]:
    """(seconds, optimizer steps, seconds per step) of the configured run on ``device``: a few timed
    training steps of its model on random images, times its steps, plus its evaluations (a forward
    pass costs about a third of a training step)."""
    train_set, test_set = open_datasets(config)
    train_images = min(config.train_subset or len(train_set), len(train_set))
    test_images = min(config.eval_subset or len(test_set), len(test_set))
    steps = planned_steps(config, train_images // config.batch_size)
    evaluations = config.epochs // config.eval_every + (config.epochs % config.eval_every > 0)

    if device.type == "cpu":
        keep_freed_memory()  # as the trainer will
    classes = dataset_classes(config, train_set)
    model = build_model(config, classes, load_weights=False).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters())
    _, criterion = make_loss(config, classes)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(config.batch_size, *model.pretrained_cfg["input_size"], generator=generator)
    targets = torch.randint(0, classes, (config.batch_size,), generator=generator)
    images, targets = images.to(device), targets.to(device)
    in_precision = autocast(device, config.amp)

    def step():
        with in_precision():
            loss = criterion(model(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocations, kernel choice
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(timed_steps):
        step()
    _synchronize(device)
    step_s = (time.perf_counter() - start) / timed_steps
    evaluation_s = test_images / config.batch_size * step_s / 3
    return steps * step_s + evaluations * evaluation_s, steps, step_s


def _in_precision(summary: dict) -> str:
    """The summary's precision for the report line; nothing for a run saved before it was recorded."""
    return f" in {summary['precision']}" if "precision" in summary else ""


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _completed_run(output: Path, config) -> dict | None:
    try:
        saved_config = json.loads((output / "config.json").read_text())
        summary = json.loads((output / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    # an option added since the run was saved counts with its default (which keeps the old behaviour)
    saved_config = dataclasses.asdict(TrainConfig()) | saved_config
    return summary if saved_config == dataclasses.asdict(config) else None


def _verification(output: Path) -> dict:
    """The gate's verdict of the run (crate/train/verification.py), without its table."""
    record = json.loads((output / "verification.json").read_text())
    return {key: record[key] for key in ("passed", "skipped", "verdict", "seconds")}


def _report(summary: dict, output: Path) -> None:
    result = summary["result"]
    if "verification" in summary:
        print(f"\nverified before training (verification.json): {summary['verification']['verdict']}")
    print(
        f"\n{summary['model']} on Fashion-MNIST ({result['eval_images']} test images): "
        f"top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}%, "
        f"{summary['epochs']} epochs{_in_precision(summary)}, {summary['wall_s']:.0f} s wall time"
    )
    if "whitebox" in result:
        layers = result["whitebox"]
        images = result.get("whitebox_images", 64)
        print(f"\nPer-layer white-box measurements on {images} test images (mean ± std over images):")
        if analysis.is_alpha(layers):
            print(
                "(CRATE-α: non-zero fraction of the ODL codes a2, m = 4d wide; the output stream adds "
                "D1·a2 to the residual and is not sparse. LASSO per image: at the zero start and after "
                "the block's two steps)"
            )
        print(analysis.format_table(layers))
    print(
        f"\nrun folder: {output} (config.json, verification.json, metrics.jsonl, checkpoints, summary.json)"
    )


if __name__ == "__main__":
    main()
