"""`crate export SOURCE --layout official|alpha --output FILE`: a fast model's weights in a released
key layout, for the released code (and anyone who reads its checkpoints).

    crate export runs/demo-crate_mini_patch7_28 --layout official --output crate_mini.safetensors
    crate export run/checkpoint-00005616 --layout official --output crate_mini.pth --format pth
    crate export run-alpha/ --layout alpha --output crate_alpha_mini.pth

SOURCE is anything `crate eval` reads (crate/weights/sources.py): a run folder (its latest checkpoint),
a checkpoint folder, a weights file, a timm name with published weights. --layout official is
CRATE's (Ma-Lab-Berkeley/CRATE `model/crate.py`), --layout alpha CRATE-α's (UCSC-VLAA/CRATE-alpha
`torch_inference/model/crate_alpha.py`); a model of the other family is refused. The file is written
to a temporary name beside FILE and renamed into place, so FILE is whole or absent. The released
loader, or `crate.models.load_official_state_dict`, reads it back.
"""

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import errors
from .errors import InvalidError
from .models.released import export_official_state_dict
from .weights import sources

# --layout: (the released layout's name in crate.models.released, the dictionary key its family has)
LAYOUTS = {"official": ("CRATE", ".ista."), "alpha": ("CRATE-α", ".odl.")}
FORMATS = {".safetensors": "safetensors", ".pth": "pth", ".pt": "pth", ".bin": "pth"}


def family_layout(state: dict, description: str) -> str:
    """The --layout of the family whose weights ``state`` holds (this project's key names)."""
    for layout, (_, dictionary) in LAYOUTS.items():
        if any(dictionary in key for key in state):
            return layout
    raise InvalidError(
        f"{description} holds no CRATE or CRATE-α model (no ISTA or ODL dictionaries): "
        "only those have released layouts"
    )


def released_state(state: dict, layout: str, description: str) -> dict[str, torch.Tensor]:
    """``state`` (this project's names) in the released ``layout`` ("official" or "alpha"), refusing
    weights of the other family."""
    family = family_layout(state, description)
    if family != layout:
        names = {"official": "CRATE", "alpha": "CRATE-α"}
        raise InvalidError(
            f"{description} holds {names[family]} weights, but --layout {layout} is {names[layout]}'s "
            f"released layout; use --layout {family}"
        )
    return export_official_state_dict(state, LAYOUTS[layout][0])


def output_format(output: Path, requested: str | None) -> str:
    """--format, else the one FILE's suffix implies (safetensors for any other suffix)."""
    implied = FORMATS.get(output.suffix)
    if requested and implied and requested != implied:
        raise InvalidError(f"--format {requested} does not match {output}'s suffix {output.suffix!r}")
    return requested or implied or "safetensors"


def write_atomically(state: dict[str, torch.Tensor], output: Path, fmt: str) -> Path:
    """``state`` to ``output`` through a temporary file in its folder, renamed into place."""
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
    try:
        if fmt == "safetensors":
            save_file(tensors, temporary)
        else:
            torch.save(tensors, temporary)
        os.replace(temporary, output)
    finally:
        temporary.unlink(missing_ok=True)
    return output


@errors.command("crate export")
def main(argv: list[str] | None = None) -> Path:
    parser = errors.Parser(prog="crate export", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="run folder, checkpoint folder, weights file or timm name")
    parser.add_argument(
        "--layout",
        required=True,
        choices=sorted(LAYOUTS),
        help="official: CRATE's released key names (Ma-Lab-Berkeley/CRATE); alpha: CRATE-α's",
    )
    parser.add_argument("--output", required=True, type=Path, help="the file to write")
    parser.add_argument(
        "--format",
        choices=("safetensors", "pth"),
        help="default: from --output's suffix (.pth/.pt/.bin: pth), else safetensors",
    )
    args = parser.parse_args(argv)
    fmt = output_format(args.output, args.format)
    source = sources.read_source(args.source)
    state = released_state(source.state, args.layout, source.description)
    write_atomically(state, args.output, fmt)
    print(f"{len(state)} tensors of {source.description} in the {args.layout} layout: {args.output} ({fmt})")
    return args.output


if __name__ == "__main__":
    main()
