"""`crate audit CHECKPOINT`: the white-box audit (crate.analysis) of a trained CRATE or CRATE-α.

    crate audit runs/demo-crate_mini_patch7_28            # a run folder: its model, on its own dataset
    crate audit crate_tiny.pth --model crate_tiny_patch16_224 --data /data/imagenet/val
    crate audit crate_alpha_B16.pth --model crate_alpha_base_patch16_224 --dataset imagenet --data /data/in1k
    crate audit run/checkpoint-00005616 --dataset digits --images 128 --seed 1

CHECKPOINT is a run folder, a checkpoint folder (model.safetensors), a .safetensors file or a .pth
state dict in a released layout (Ma-Lab-Berkeley/CRATE or UCSC-VLAA/CRATE-alpha key names).
--dataset, --data and --split are `crate eval`'s (a run measures on its own dataset by default), and
so are the images: the split through the model's evaluation transform, --images of them drawn with
--seed. Writes audit.json, audit.md, layers.png and attention.png and prints the table.
"""

from pathlib import Path

import timm
import timm.data
import torch

from . import analysis, data, errors
from .errors import InvalidError
from .evaluate import add_dataset_flags, dataset_flags, evaluation_split
from .weights import sources


def load_model(path: Path, model_name: str | None = None) -> tuple[torch.nn.Module, str]:
    """(model in eval mode, model name) from a run folder, checkpoint folder or weights file."""
    source = sources.read_source(path)
    name = model_name or source.model_name
    if name is None:
        raise InvalidError(f"{path} comes with no config.json: name the architecture with --model")
    _check_family(source.state, name, path)
    return sources.build_model(source, name)


def _check_family(state: dict, model_name: str, path: Path) -> None:
    """A CRATE-α checkpoint (ODL dictionaries blocks.*.odl.D/D1) needs a crate_alpha_* model and a
    CRATE checkpoint (ISTA dictionaries blocks.*.ista.weight) a crate_* one: say so before the
    key-by-key mismatch list."""
    if not model_name.startswith("crate_"):
        return
    is_alpha = model_name.startswith("crate_alpha_")
    if any(".odl." in key for key in state) and not is_alpha:
        raise InvalidError(
            f"{path} holds CRATE-α weights (ODL dictionaries D, D1), but --model {model_name} is a CRATE; "
            "name a crate_alpha_* model of the checkpoint's size (e.g. crate_alpha_base_patch16_224)"
        )
    if any(".ista." in key for key in state) and is_alpha:
        raise InvalidError(
            f"{path} holds CRATE weights (ISTA dictionaries), but --model {model_name} is a CRATE-α; "
            "name a crate_* model of the checkpoint's size (e.g. crate_base_patch16_224)"
        )


def load_images(
    model: torch.nn.Module, dataset: str, root: str | None, split: str, count: int, seed: int = 0
) -> torch.Tensor:
    """``count`` images of the split drawn with ``seed``, as `crate eval` reads them (crate.data.open_split,
    the model's evaluation transform); unreadable ones are skipped, their paths logged."""
    evaluation, _ = evaluation_split(model, dataset, root, split)
    chosen = data.sample(evaluation, count, seed)
    samples = [chosen[index] for index in range(len(chosen))]
    images = [sample[0] for sample in samples if sample is not None]
    if not images:
        raise InvalidError(f"{dataset} ({split}) has no readable image to audit")
    return torch.stack(images)


@errors.command("crate audit")
def main(argv: list[str] | None = None) -> dict:
    parser = errors.Parser(prog="crate audit", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--model", help="timm model name (read from the run's config.json when present)")
    add_dataset_flags(parser)
    parser.add_argument(
        "--images", type=int, default=64, help="how many images to measure on (drawn with --seed)"
    )
    parser.add_argument("--seed", type=int, default=0, help="which images --images draws")
    parser.add_argument("--layer", type=int, default=-1, help="layer of the attention maps (default: last)")
    parser.add_argument("--output", type=Path, help="default: <checkpoint>/audit")
    args = parser.parse_args(argv)
    dataset, root, split = dataset_flags(args.checkpoint, args.dataset, args.data, args.split)
    model, name = load_model(args.checkpoint, args.model)
    images = load_images(model, dataset, root, split, args.images, args.seed)
    output = (
        args.output or (args.checkpoint if args.checkpoint.is_dir() else args.checkpoint.parent) / "audit"
    )
    config = timm.data.resolve_data_config({}, model=model)
    paths = analysis.write_report(
        model,
        images,
        output,
        title=f"{name} on {dataset} ({split})",
        mean=config["mean"],
        std=config["std"],
        layer=args.layer,
    )
    print(paths["markdown"].read_text())
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return paths


if __name__ == "__main__":
    main()
