"""Where a model's time goes: torch.profiler over a few training (or inference) steps, grouped by
operator, as a Markdown table.

    python -m benchmarks.profile                                    # CRATE-T, train, batch 8, float32
    python -m benchmarks.profile --model crate_small_patch16_224 --mode inference --rows 20
    python -m benchmarks.profile --naive                            # the released formulation instead

CPU or CUDA (whichever runs the model); float32 unless --amp (bf16 autocast).
"""

import argparse

import timm
import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.naive import NaiveCRATE, NaiveCRATEAlpha
from crate import alpha_variant_config, variant_config
from crate.runtime import keep_freed_memory


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


def step_function(model, input_size: tuple, classes: int, mode: str, batch: int, amp: bool, device):
    images = torch.randn(batch, *input_size, device=device)
    labels = torch.randint(0, classes, (batch,), device=device)
    optimizer = torch.optim.AdamW(model.parameters()) if mode == "train" else None
    model.train(mode == "train")

    def step():
        with torch.set_grad_enabled(mode == "train"), torch.autocast(device.type, torch.bfloat16, amp):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return step


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
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps, after two warm-up steps")
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--naive", action="store_true", help="the released formulation (benchmarks.naive)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        keep_freed_memory()  # as the trainer runs
    model, input_size, classes = build(args.model, args.naive, device)
    step = step_function(model, input_size, classes, args.mode, args.batch, args.amp, device)
    for _ in range(2):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    precision = "bf16 autocast" if args.amp else "float32"
    title = (
        f"{'naive ' if args.naive else ''}{args.model}, {args.mode}, batch {args.batch}, {precision}, "
        f"{device.type} ({torch.get_num_threads()} threads), {args.steps} steps"
    )
    result = f"{title}\n\n{table(prof, args.rows, key)}"
    print(result)
    return result


if __name__ == "__main__":
    main()
