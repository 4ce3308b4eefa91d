"""Where a model's time goes: torch.profiler over a few training (or inference) steps, grouped by
operator, as a Markdown table; on CUDA also the launch-bound test: images/s per batch size, and the
GPU's summed kernel time against the wall time per step (near 1: the GPU computes all the time,
compute-bound; well below 1: it waits for the CPU to launch kernels, launch-bound), with the kernels
taking the most time.

    python -m benchmarks.profile                                    # CRATE-T, train, batch 8, float32
    python -m benchmarks.profile --model crate_small_patch16_224 --mode inference --rows 20
    python -m benchmarks.profile --naive                            # the released formulation instead
    python -m benchmarks.profile --amp --batch 256 512 --compile --output out.md   # the GPU's question

CPU or CUDA (whichever runs the model); float32 unless --amp (bf16 autocast); --compile: the training
step as crate train compiles it (crate/train/compiled.py).
"""

import argparse
import time
from pathlib import Path

import timm
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks.naive import NaiveCRATE, NaiveCRATEAlpha
from crate import alpha_variant_config, variant_config
from crate.runtime import keep_freed_memory
from crate.train.compiled import forward_loss
from crate.train.setup import set_fused


def build(name: str, naive: bool, device: torch.device) -> tuple[torch.nn.Module, tuple, int]:
    """The model (or its released formulation), its input size and its class count."""
    model = timm.create_model(name)
    input_size, classes = model.pretrained_cfg["input_size"], model.num_classes
    if naive and name.startswith("crate_alpha"):
        model = NaiveCRATEAlpha(alpha_variant_config(name))
    elif naive and name.startswith("crate_"):
        model = NaiveCRATE(variant_config(name))
    elif naive:
        raise SystemExit(f"--naive: {name} has no released formulation here (crate_* and crate_alpha_* do)")
    return model.to(device), input_size, classes


def step_function(
    model, input_size: tuple, classes: int, mode: str, batch: int, amp: bool, device, compiled: bool = False
):
    images = torch.randn(batch, *input_size, device=device)
    labels = torch.randint(0, classes, (batch,), device=device)
    optimizer = torch.optim.AdamW(model.parameters()) if mode == "train" else None
    if optimizer is not None:
        set_fused(optimizer, compiled)
    model.train(mode == "train")
    loss_of = forward_loss(
        model,
        torch.nn.functional.cross_entropy,
        lambda: torch.autocast(device.type, torch.bfloat16, amp),
        "default" if compiled else None,
    )

    def step():
        with torch.set_grad_enabled(mode == "train"):
            loss = loss_of(images, labels)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return step


def kernel_events(prof) -> list:
    """The profile's GPU-side events (kernels, copies, sets), each with its device time in µs."""
    return [event for event in prof.events() if event.device_type == DeviceType.CUDA]


def kernel_table(prof, rows: int) -> str:
    """The GPU kernels taking the most device time: summed time, share, launches."""
    totals: dict[str, list] = {}
    for event in kernel_events(prof):
        entry = totals.setdefault(event.name, [0.0, 0])
        entry[0] += event.device_time_total
        entry[1] += 1
    whole = sum(total for total, _ in totals.values()) or 1.0
    lines = ["| kernel | device time (ms) | share | launches |", "|---|---|---|---|"]
    for name, (total, count) in sorted(totals.items(), key=lambda item: -item[1][0])[:rows]:
        shown = name if len(name) <= 90 else name[:87] + "..."
        lines.append(f"| `{shown}` | {total / 1e3:.1f} | {100 * total / whole:.1f}% | {count} |")
    return "\n".join(lines)


def timed(step, steps: int, device: torch.device) -> float:
    """Seconds per step over ``steps`` steps, the device synchronised at both ends."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def table(prof, rows: int, total_key: str) -> str:
    """The operators taking the most self time: self time, its share, calls."""
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, total_key), reverse=True)
    total = sum(getattr(e, total_key) for e in events)
    lines = ["| operator | self time (ms) | share | calls |", "|---|---|---|---|"]
    for event in events[:rows]:
        own = getattr(event, total_key)
        lines.append(f"| `{event.key}` | {own / 1e3:.1f} | {100 * own / total:.1f}% | {event.count} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="crate_tiny_patch16_224")
    parser.add_argument("--mode", choices=["train", "inference"], default="train")
    parser.add_argument("--batch", type=int, nargs="+", default=[8], help="one or more batch sizes")
    parser.add_argument("--steps", type=int, default=3, help="timed, then profiled, after two warm-up steps")
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--naive", action="store_true", help="the released formulation (benchmarks.naive)")
    parser.add_argument("--compile", action="store_true", help="the trainer's compiled step (train mode)")
    parser.add_argument("--output", type=Path, help="also write the tables (Markdown) to this file")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        keep_freed_memory()  # as the trainer runs
    model, input_size, classes = build(args.model, args.naive, device)
    cuda = device.type == "cuda"
    summary = [
        "| batch | images/s | wall ms per step | GPU kernel ms per step | kernel / wall |",
        "|---|---|---|---|---|",
    ]
    for batch in args.batch:
        step = step_function(model, input_size, classes, args.mode, batch, args.amp, device, args.compile)
        for _ in range(2):
            step()  # warm-up: a compiled step compiles here (again for another batch size)
        wall = timed(step, args.steps, device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                step()
            if cuda:
                torch.cuda.synchronize()
        if cuda:
            kernels = sum(event.device_time_total for event in kernel_events(prof)) / 1e6 / args.steps
            busy = f"{1e3 * kernels:.1f} | {kernels / wall:.2f}"
        else:
            busy = "n/a (CPU) | n/a"
        summary.append(f"| {batch} | {batch / wall:.1f} | {1e3 * wall:.1f} | {busy} |")
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    precision = "bf16 autocast" if args.amp else "float32"
    title = (
        f"{'naive ' if args.naive else ''}{args.model}, {args.mode}, "
        f"batch {', '.join(map(str, args.batch))}, "
        f"{precision}, {'compiled' if args.compile else 'eager'}, "
        f"{torch.cuda.get_device_name() if cuda else 'cpu'} ({torch.get_num_threads()} threads), "
        f"{args.steps} steps"
    )
    operators = f"operators, batch {args.batch[-1]}:\n\n{table(prof, args.rows, key)}"
    parts = [title, "\n".join(summary), operators]
    if cuda:
        parts.append(f"kernels, batch {args.batch[-1]}:\n\n{kernel_table(prof, args.rows)}")
    result = "\n\n".join(parts)
    print(result)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(result + "\n")
    return result


if __name__ == "__main__":
    main()
