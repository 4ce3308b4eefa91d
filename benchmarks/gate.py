"""What the gate costs (crate/verify: `crate verify`, and every `crate train` before its first step),
beside one training step of the same model on the same device and precision.

    python -m benchmarks.gate                          # CPU: the demo model, CRATE-T, CRATE-B, CRATE-α-B/16
    python -m benchmarks.gate --device cuda --compile  # GPU: eager and compiled

For each model and precision: the gate's wall time at its default 2 images (model construction
excluded; the first call, as a run makes it), and one optimizer step at --batch images (forward,
backward, AdamW; median of 3 after one warm-up), so that the gate's cost reads in training steps.
"""

import argparse
import statistics
import time

import timm
import torch

import crate  # noqa: F401  (registers the models with timm)
from crate.runtime import cpu_has_native_bf16
from crate.verify import check_model

MODELS = [
    "crate_mini_patch7_28",
    "crate_tiny_patch16_224",
    "crate_base_patch16_224",
    "crate_alpha_base_patch16_224",
]


def _step_seconds(model, batch: int, precision: str, device) -> float:
    optimizer = torch.optim.AdamW(model.parameters())
    images = torch.randn(batch, model.config.in_chans, *model.patch_embed.img_size, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    times = []
    for _ in range(4):
        start = time.perf_counter()
        with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16-autocast"):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"))
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument(
        "--batch",
        type=int,
        default=0,
        help="training batch (default: 128 at 28², 8 on the CPU at 224², 256 on a GPU)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="also the compiled gate (compilation included)"
    )
    args = parser.parse_args()
    precisions = ["float32"] + (
        ["bf16-autocast"] if args.device.type == "cuda" or cpu_has_native_bf16() else []
    )
    cpu = args.device.type == "cpu"
    device = "cpu" if cpu else torch.cuda.get_device_name(args.device)
    print(f"device: {device}; native bf16: {cpu_has_native_bf16()}")
    print(
        "| model | precision | compiled | quantities | gate (s) | training step (s) at batch | gate / step |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        for precision in precisions:
            for compiled in [False] + ([True] if args.compile else []):
                torch.manual_seed(0)
                model = timm.create_model(name).to(args.device).train()
                report = check_model(model, precision, compiled=compiled)
                batch = args.batch or (128 if model.patch_embed.img_size[0] == 28 else (8 if cpu else 256))
                step = _step_seconds(model, batch, precision, args.device)
                verdict = f"{len(report.rows)} {'pass' if report.passed else 'FAIL'}"
                print(
                    f"| {name} | {precision} | {compiled} | {verdict} "
                    f"| {report.seconds:.2f} | {step:.3f} at {batch} | {report.seconds / step:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
