"""`crate train` and `python -m crate.train` (torchrun's entry): the options, each a TrainConfig field,
over the preset's values; a resumed run's own options; the run; its exit code (0, 2, faults.py's or the
gate's 70)."""

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path

import torch.distributed as dist

from .. import errors
from ..weights import sources
from .config import SESSION_OPTIONS, ConfigError, TrainConfig, option_help
from .faults import NonFiniteStepsError, PreemptedError
from .loop import train
from .objective import check_options, is_masked_autoencoder
from .presets import PRESETS
from .verification import UnverifiedError

log = logging.getLogger("crate.train")

EXAMPLES = """examples:
  crate train                                        the Fashion-MNIST demo recipe on the CPU
  crate train --preset paper --data /data/imagenet   the paper's ImageNet recipe
  crate train --finetune runs/demo-crate_mini_patch7_28 --dataset digits --labels-per-class 10
  crate train --preset mae --model crate_mae_mini_patch4_28 --dataset fashion-mnist
                                                     MAE pre-training (runs/mae-fashion-mnist)
  crate train --finetune runs/mae-fashion-mnist --model crate_mae_encoder_mini_patch4_28
                                                     its encoder fine-tuned as a classifier
  crate train --output RUN --resume                  continue RUN with its own options"""


# session options that a continued run does not take over from the session that saved config.json
THIS_SESSION_ONLY = {"stop_after": 0, "skip_verify": False}


def resolve_config(argv: list[str] | None = None) -> TrainConfig:
    """Preset values, then every command-line override; with --resume, the run's own config.json."""
    given = {key: value for key, value in vars(parser().parse_args(argv)).items() if value is not None}
    values = PRESETS.get(given.get("preset", TrainConfig.preset), {}) | given
    if values.get("finetune") and "model" not in given:  # the architecture the source names, if any
        values["model"] = sources.source_model_name(values["finetune"]) or values.get(
            "model", TrainConfig.model
        )
    if "output" not in given:
        values["output"] = default_output(values, given)
    if values.get("resume"):
        return continued(values["output"], given)
    preset = PRESETS.get(values.get("preset", TrainConfig.preset), {})
    return TrainConfig(**(values | check_options(TrainConfig(**values), given, preset)))


def default_output(values: dict, given: dict) -> str:
    """The preset's run folder, unless the run is not the preset's: a fine-tune, another dataset or
    another kind of model gets its own (runs/finetune-<dataset>-<model>, runs/<dataset>, and
    runs/mae-<dataset> for a masked autoencoder)."""
    preset = PRESETS.get(values.get("preset", TrainConfig.preset), {})
    dataset = values.get("dataset", TrainConfig.dataset)
    if "finetune" in given:
        return f"runs/finetune-{dataset.replace('/', '-')}-{values['model']}"
    autoencoder = is_masked_autoencoder(values.get("model", TrainConfig.model))
    presets_kind = is_masked_autoencoder(preset.get("model", TrainConfig.model))
    if dataset != preset.get("dataset", TrainConfig.dataset) or autoencoder != presets_kind:
        return f"runs/{'mae-' if autoencoder else ''}{dataset.replace('/', '-')}"
    return values.get("output", TrainConfig.output)


def continued(output: str, given: dict) -> TrainConfig:
    """The configuration of the run in ``output`` (its config.json), with this session's options
    (SESSION_OPTIONS); any other option given must equal the run's, else a ConfigError names it."""
    saved_path = Path(output) / "config.json"
    if not saved_path.is_file():
        raise ConfigError(
            f"--resume: {output} holds no run to continue (no config.json there); name the run with "
            "--output, or leave out --resume to start one"
        )
    saved = json.loads(saved_path.read_text())
    known = {field.name: field.default for field in dataclasses.fields(TrainConfig)}
    unknown = sorted(saved.keys() - known.keys())
    if unknown:
        raise ConfigError(f"{saved_path} holds options this crate train does not know: {unknown}")
    saved = known | saved
    conflicts = [
        f"--{_flag(name)} {value} (the run's: {saved[name]})"
        for name, value in given.items()
        if name not in SESSION_OPTIONS | {"output"} and value != saved[name]
    ]
    if conflicts:
        raise ConfigError(
            f"--resume continues {output} with the options of its config.json, and these differ: "
            f"{', '.join(conflicts)}; leave them out, or train a new run in another --output"
        )
    session = {name: value for name, value in given.items() if name in SESSION_OPTIONS}
    return TrainConfig(**(saved | THIS_SESSION_ONLY | session | dict(output=output, resume=True)))


def parser() -> argparse.ArgumentParser:
    """One option per TrainConfig field: its comment as help, its default and the presets' values."""
    parser = errors.Parser(
        prog="crate train",
        usage="crate train [--preset NAME] [--OPTION VALUE ...]",
        description="Train or fine-tune CRATE, CRATE-α or any timm model. Every option overrides the\n"
        "preset's value; the run folder (--output) keeps config.json, metrics.jsonl and checkpoints.",
        epilog=f"presets:\n{preset_table()}\n\n{EXAMPLES}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    descriptions = option_help()
    for field in dataclasses.fields(TrainConfig):
        text = (descriptions[field.name] + _defaults(field)).replace("%", "%%")
        if field.type in (bool, bool | None):
            parser.add_argument(f"--{_flag(field.name)}", action=argparse.BooleanOptionalAction, help=text)
        else:
            kind = field.type if field.type in (int, float) else str
            parser.add_argument(f"--{_flag(field.name)}", type=kind, metavar=field.name.upper(), help=text)
    return parser


def preset_table() -> str:
    defaults = {field.name: field.default for field in dataclasses.fields(TrainConfig)}
    width = max(map(len, PRESETS))
    lines = []
    for name, changes in PRESETS.items():
        recipe = defaults | changes
        lines.append(
            f"  {name:<{width}}  {recipe['model']} on {recipe['dataset']}, {recipe['epochs']} epochs, "
            f"{recipe['opt']}" + (f", from {recipe['finetune']}" if recipe["finetune"] else "")
        )
    return "\n".join(lines)


def _defaults(field: dataclasses.Field) -> str:
    """ " (default: D; PRESET, PRESET: V; ...)": the presets that change the value, grouped by value."""
    by_value: dict[str, list[str]] = {}
    for name, values in PRESETS.items():
        if field.name in values and values[field.name] != field.default:
            by_value.setdefault(str(values[field.name]), []).append(name)
    shown = [
        f"default: {field.default}",
        *(f"{', '.join(names)}: {value}" for value, names in by_value.items()),
    ]
    return f" ({'; '.join(shown)})"


def _flag(name: str) -> str:
    return name.replace("_", "-")


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
