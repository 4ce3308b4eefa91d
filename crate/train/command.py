"""`crate train` and `python -m crate.train` (torchrun's entry): the options, each a TrainConfig field,
over the preset's values; the run; its exit code (0, 2, faults.py's or the gate's 70)."""

import argparse
import dataclasses
import json
import logging
import os

import torch.distributed as dist

from .. import errors
from ..weights import sources
from .config import TrainConfig
from .faults import NonFiniteStepsError, PreemptedError
from .loop import train
from .presets import PRESETS
from .verification import UnverifiedError

log = logging.getLogger("crate.train")


def resolve_config(argv: list[str] | None = None) -> TrainConfig:
    """Preset values, then every command-line override."""
    parser = errors.Parser(
        prog="crate train", description="Train or fine-tune CRATE, CRATE-α or any timm model."
    )
    for field in dataclasses.fields(TrainConfig):
        flag = f"--{field.name.replace('_', '-')}"
        if field.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction)
        else:
            parser.add_argument(flag, type=field.type if field.type in (int, float) else str)
    args = {key: value for key, value in vars(parser.parse_args(argv)).items() if value is not None}
    preset = args.get("preset", TrainConfig.preset)
    values = PRESETS.get(preset, {}) | args
    if values.get("finetune") and "model" not in args:  # the architecture the source names, if any
        values["model"] = sources.source_model_name(values["finetune"]) or values.get(
            "model", TrainConfig.model
        )
    return TrainConfig(**values)


@errors.command("crate train")
def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = resolve_config(argv)
    try:
        result = train(config)
    except (PreemptedError, NonFiniteStepsError, UnverifiedError) as stop:
        log.error("%s", stop)
        if dist.is_initialized():
            dist.destroy_process_group()
        raise SystemExit(stop.exit_code) from None
    if result and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "whitebox"}))
    if dist.is_initialized():
        dist.destroy_process_group()
