"""How far each deployed form (crate/deploy.py) is from eager, per model: a Markdown table.

python -m benchmarks.deployment [--models NAME[@IMG] ...] [--forms fx script ...] [--batch 4]

Each cell: max|form − eager| over the logits of one random batch (float32, inference, without
autograd; the forms built as a user would, with autograd on: export and ONNX hold the explicit
attention, eager runs SDPA), then, in brackets, the form's error against a float64 eager run over
eager float32's own error (tests/test_deployment.py asserts <= 2 plus a rounding allowance).
"""

import argparse
import tempfile

import timm
import torch

import crate  # noqa: F401  (registers the models)
from crate.deploy import FORMS

MODELS = [
    "crate_mini_patch4_28",
    "crate_alpha_mini_patch4_28",
    "crate_tiny_patch16_224",
    "crate_alpha_base_patch16_224",
]


def measure(
    name: str, forms: list[str], batch: int, img_size: int | None = None
) -> dict[str, tuple[float, float]]:
    """form: (max|form − eager|, error vs float64 / eager's error vs float64)."""
    overrides = {} if img_size is None else dict(img_size=img_size)
    torch.manual_seed(0)
    model = timm.create_model(name, **overrides).eval()
    twin = timm.create_model(name, **overrides).eval().double()
    twin.load_state_dict(model.state_dict())
    embed = model.patch_embed
    images = torch.randn(
        batch + 1, embed.in_chans, *embed.img_size, generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        reference, eager = twin(images.double()), model(images)
    eager_error = (eager.double() - reference).abs().max().item()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for form in forms:
            deployed = FORMS[form](model, images[:batch], folder)
            with torch.no_grad():
                outputs = deployed(images)
            error = (outputs.double() - reference).abs().max().item()
            results[form] = ((outputs - eager).abs().max().item(), error / eager_error)
    return results


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=MODELS, help="timm names, NAME@IMG for another image size"
    )
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
    parser.add_argument("--batch", type=int, default=4, help="export example batch; measured on batch + 1")
    args = parser.parse_args(argv)
    lines = ["| model | " + " | ".join(args.forms) + " |", "|---|" + "---|" * len(args.forms)]
    for spec in args.models:
        name, _, size = spec.partition("@")
        results = measure(name, args.forms, args.batch, int(size) if size else None)
        cells = [f"{difference:.1e} ({ratio:.2f})" for difference, ratio in results.values()]
        lines.append(f"| `{spec}` | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
