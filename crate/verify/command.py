"""`crate verify SOURCE`: the fast model as a run would execute it, checked layer by layer against the
float64 reference of the same weights, forward and backward, by the precision rule.

    crate verify crate_tiny_patch16_224                              # a random initialisation
    crate verify runs/demo-crate_mini_patch7_28 --precision float32  # a trained run folder
    crate verify crate_alpha_b16.pth --model crate_alpha_base_patch16_224 --compile
    crate verify crate_base_patch16_224 --device cuda --precision bf16-autocast --grad-checkpointing
    crate verify crate_mae_mini_patch4_28                            # CRATE-MAE, part by part

SOURCE is what `crate train --finetune` accepts (crate/weights/sources.py): a run or checkpoint folder,
a .safetensors or .pth file (this project's names or a released layout; name the architecture with
--model), a tagged timm name with published weights; a bare model name is checked at a seeded random
initialisation. It prints one table (path, part, quantity, error, plain error, ratio, bound, verdict),
writes it as JSON to --json and exits with 0 when every quantity keeps the rule, 70 (the gate's code,
README "Exit codes") naming the first violation when one does not, 2 for a source or option that
cannot be checked.
"""

import argparse
import json
from pathlib import Path

import timm
import torch
from timm.models import split_model_name_tag

from .. import errors
from ..errors import InvalidError
from ..runtime import default_device
from ..weights import sources
from . import rule
from .families import has_reference
from .gate import EXIT_FAILED, Report, check_model
from .rule import default_precision

PRECISIONS = {"float32": "float32", "bf16": "bfloat16", "fp16": "float16", "bf16-autocast": "bf16-autocast"}


def build(args: argparse.Namespace) -> torch.nn.Module:
    """The model of SOURCE with the options, on the device, in the precision's dtype, in train mode."""
    overrides = dict(drop_path_rate=args.drop_path) | ({} if args.fused_attn else dict(fused_attn=False))
    if args.img_size:
        overrides["img_size"] = args.img_size
    path = Path(args.source)
    if not path.exists() and timm.is_model(args.source) and not split_model_name_tag(args.source)[1]:
        torch.manual_seed(args.seed)
        model = timm.create_model(args.source, **overrides)
    else:
        model, _ = sources.build_model(sources.read_source(args.source), args.model, **overrides)
    if not has_reference(model):
        raise InvalidError(
            f"{args.source}: {type(model).__name__} is neither CRATE nor CRATE-α: there is no reference"
        )
    model.set_grad_checkpointing(args.grad_checkpointing)
    if hasattr(model, "recompute_norms"):  # CRATE's and CRATE-α's; CRATE-MAE recomputes none
        model.recompute_norms = args.recompute_norms
    return model.to(device=args.device, dtype=rule.PRECISIONS[PRECISIONS[args.precision]][0]).train()


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = errors.Parser(
        prog="crate verify",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("source", help="run folder, checkpoint folder, weights file or timm model name")
    parser.add_argument("--model", help="timm architecture, for weights files without a config.json")
    parser.add_argument("--device", type=torch.device, default=default_device())
    parser.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        help="default: a training run's on the device (bf16-autocast "
        "on CUDA and on CPUs with native bf16, else float32)",
    )
    parser.add_argument("--compile", action="store_true", help="check the torch.compile'd model")
    parser.add_argument("--img-size", type=int, help="build the model at this image size")
    parser.add_argument("--batch", type=int, default=2, help="images checked")
    parser.add_argument(
        "--seed", type=int, default=0, help="of the images, the upstream gradients, a random init"
    )
    parser.add_argument("--fused-attn", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--recompute-norms", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--drop-path", type=float, default=0.0, help="drop-path rate (held off while checked)"
    )
    parser.add_argument("--json", type=Path, default=Path("verification.json"), help="where the table goes")
    parser.add_argument("--quiet", action="store_true", help="print the verdict only")
    args = parser.parse_args(argv)
    args.precision = args.precision or default_precision(args.device)
    return args


@errors.command("crate verify")
def main(argv: list[str] | None = None) -> Report:
    args = parse(argv)
    model = build(args)
    report = check_model(
        model, PRECISIONS[args.precision], batch=args.batch, seed=args.seed, compiled=args.compile
    )
    report.model = split_model_name_tag(args.model or sources.source_model_name(args.source) or args.source)[
        0
    ]
    if not args.quiet:
        print(
            f"{report.model} from {args.source} on {report.device}, {args.precision}"
            + (", compiled" if args.compile else "")
        )
        print(report.table())
    print(report.verdict())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report.to_dict() | dict(source=args.source), indent=2) + "\n")
    if not report.passed:
        raise SystemExit(EXIT_FAILED)
    return report
