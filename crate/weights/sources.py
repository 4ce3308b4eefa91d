"""Where a model's weights come from, for `crate train --finetune SOURCE`, `crate eval SOURCE` and
`crate audit SOURCE`.

SOURCE is one of:
- a run folder (its config.json names the model; its newest intact checkpoint is read: one whose
  model.safetensors does not match sha256.json is named in a warning and the one before it read);
- a checkpoint folder (model.safetensors, checked against sha256.json; the run's config.json one level
  up names the model);
- a weights file: .safetensors, or a .pth/.pt/.bin state dict in this project's names, timm's, or a
  released layout (Ma-Lab-Berkeley/CRATE, UCSC-VLAA/CRATE-alpha), training wrappers unwrapped;
- a timm model name with published weights, optionally tagged (`crate_alpha_base_patch16_224.in21k`,
  `vit_small_patch16_224.augreg_in21k`): timm reads them from its cache or the Hugging Face Hub.

`read_source` returns the state dict and the model name the source implies; `load_for_finetuning`
loads it into a model for a new task (everything but the classifier, strictly) and says what it did.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.models import split_model_name_tag

from ..errors import InvalidError, MissingError
from ..models import CRATE, convert_official_state_dict
from ..models.crate import MODELS
from ..models.hub import require_hub_weights
from ..models.mae import CRATEMAEEncoder, convert_released_mae_state_dict, encoder_state_dict
from ..models.released import adapt_input_channels, fit_problems, input_channels, resample_to_model
from . import checkpoint
from .checkpoint import read_weights, step_folder

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


@dataclass
class Source:
    state: dict[str, torch.Tensor]  # this project's (or timm's) key names
    model_name: str | None  # the architecture the source names; None for a bare weights file
    description: str  # for messages: what was read


def read_source(source: str | Path) -> Source:
    """The weights of ``source`` (see the module docstring). A path that does not exist and is no timm
    model name with weights raises FileNotFoundError saying what was tried."""
    path = Path(source)
    if path.exists():
        return _read_path(path)
    name = str(source)
    if timm.is_model(name):
        return _read_timm(name)
    raise MissingError(
        f"{source}: neither a file or folder (run folder, checkpoint folder, {', '.join(WEIGHT_SUFFIXES)}) "
        "nor a timm model name (timm.list_models() lists them; `import crate` adds crate_* and crate_alpha_*)"
    )


def source_model_name(source: str | Path) -> str | None:
    """The architecture a source names, without reading its weights: the model of a run folder's
    config.json (a checkpoint folder's run's), a timm name without its tag; None for a weights file."""
    path = Path(source)
    if path.is_dir():
        for folder in (path, path.parent):
            if (folder / "config.json").is_file():
                return json.loads((folder / "config.json").read_text())["model"]
        return None
    if not path.exists() and timm.is_model(str(source)):
        return split_model_name_tag(str(source))[0]
    return None


def _read_path(path: Path) -> Source:
    model_name = source_model_name(path)
    if path.is_dir():
        if not checkpoint.is_checkpoint(path) and not (path / "config.json").is_file():
            raise MissingError(
                f"{path} is neither a run folder (config.json and checkpoint-<step>/ folders) nor a "
                "checkpoint folder (model.safetensors and sha256.json)"
            )
        state, folder = checkpoint.read_weights(path)  # digests checked, a run's newest intact one
        return Source(state, model_name, str(folder / "model.safetensors"))
    if path.suffix not in WEIGHT_SUFFIXES:
        raise InvalidError(f"{path}: not a weights file (expected one of {', '.join(WEIGHT_SUFFIXES)})")
    state = _load_safetensors(path) if path.suffix == ".safetensors" else _load_pickled(path)
    if not isinstance(state, dict):
        raise InvalidError(f"{path} holds a {type(state).__name__}, not a state dict")
    return Source(convert_official_state_dict(state), model_name, str(path))


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (OSError, SafetensorError) as error:
        raise InvalidError(checkpoint.unreadable_safetensors(path)) from error


def _load_pickled(path: Path):
    """torch.load(weights_only=True) of a .pth/.pt/.bin file. Its errors are not passed on: for a
    file it refuses, torch advises weights_only=False, which runs whatever the file pickles."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and torch each raise their own types
        raise InvalidError(
            f"{path} is not a readable PyTorch state dict: it is truncated, corrupt, or pickles more than "
            "tensors and plain data (which torch.load(weights_only=True) refuses, and which is unsafe to "
            "load); save the weights as .safetensors (safetensors.torch.save_file(model.state_dict(), "
            "...)) where they were made, or pass a run or checkpoint folder"
        ) from error


def _read_timm(name: str) -> Source:
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.url or cfg.hf_hub_id or cfg.file or cfg.state_dict):
        raise InvalidError(
            f"{name}: timm knows the model but has no published weights for it "
            f"(timm.list_pretrained('{split_model_name_tag(name)[0]}*') lists the tags that do)"
        )
    if split_model_name_tag(name)[0] not in MODELS:  # the crate registry checks its own
        require_hub_weights(name, cfg)
    model = timm.create_model(name, pretrained=True)
    return Source(model.state_dict(), split_model_name_tag(name)[0], f"timm's pretrained {name}")


@dataclass
class LoadReport:
    """What load_for_finetuning did, for the log."""

    source: str
    loaded: int = 0
    not_loaded: dict[str, str] = field(default_factory=dict)  # key -> why
    resampled: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)  # the first layer, for another channel count
    converted: str | None = None  # what became of an autoencoder's weights

    def __str__(self) -> str:
        lines = [f"fine-tuning from {self.source}: {self.loaded} tensors loaded"]
        lines += [f"  {self.converted}"] if self.converted else []
        lines += [f"  not loaded: {key}: {why}" for key, why in self.not_loaded.items()]
        lines += [f"  {note}" for note in self.resampled + self.adapted]
        return "\n".join(lines)


def classifier_prefix(model: torch.nn.Module) -> str:
    """The classifier's module name ("head" for CRATE and timm's ViTs), from timm's pretrained cfg."""
    name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    return name[0] if isinstance(name, (tuple, list)) else name


def load_for_finetuning(model: torch.nn.Module, source: Source) -> LoadReport:
    """Load every tensor of ``model`` except its classifier from ``source``, strictly: a missing,
    unexpected or mis-shaped key raises a ValueError naming each. The classifier keeps its fresh
    initialisation (the new task's classes); a position embedding of another patch grid is resampled,
    and a first layer for another number of image channels adapted as timm does (3 → in_chans=1: summed
    over RGB; crate/models/released.py adapt_input_channels)."""
    report = LoadReport(source.description)
    head = classifier_prefix(model) + "."
    state = {key: value for key, value in source.state.items()}
    if isinstance(model, CRATEMAEEncoder):
        state, report.converted = autoencoder_to_encoder(state)
    for key in [key for key in state if key.startswith(head)]:
        value = state.pop(key)
        report.not_loaded[key] = (
            f"the source's classifier ({tuple(value.shape)}) is replaced by a new one for the task's "
            f"{model.num_classes} classes"
        )
    if "pos_embed" in state and state["pos_embed"].shape != model.pos_embed.shape:
        before = state["pos_embed"].shape[1]
        state["pos_embed"] = resample_to_model(state["pos_embed"], model)
        report.resampled.append(
            f"pos_embed resampled from {before} to {model.pos_embed.shape[1]} positions "
            "(bicubic; the prefix tokens' kept)"
        )
    state, adapted = adapt_input_channels(state, model)
    if adapted:
        report.adapted.append(adapted)
    problems = fit_problems(state, model, head)
    if problems:
        raise InvalidError(
            f"{source.description} does not fit {type(model).__name__}: every tensor but the classifier "
            "must load: " + "; ".join(problems)
        )
    model.load_state_dict(state, strict=False)
    report.loaded = len(state)
    return report


def autoencoder_to_encoder(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str | None]:
    """(state, note): a CRATE-MAE autoencoder's weights (this project's names, or the release's:
    decoder_pos_embed) as its encoder's (crate.models.mae.encoder_state_dict); any other state as it is,
    with no note."""
    released = "decoder_pos_embed" in state
    if released:
        state = convert_released_mae_state_dict(state)
    elif not any(key.startswith("decoder_blocks.") for key in state):
        return state, None
    kind = (
        "a released CRATE-MAE autoencoder (its key names converted)"
        if released
        else "a CRATE-MAE autoencoder"
    )
    note = (
        f"{kind}: its encoder loaded (the decoder and mask token dropped, the final norm as fc_norm); "
        "the classifier (head) is new"
    )
    return encoder_state_dict(state), note


def build_model(source: Source, model_name: str | None = None, **kwargs) -> tuple[torch.nn.Module, str]:
    """(model with the source's weights loaded strictly, head included, in eval mode; its name): the
    architecture is ``model_name``, else the one the source names; the class count and image channels
    are the source's."""
    name = model_name or source.model_name
    if name is None:
        raise InvalidError(
            f"{source.description} names no architecture (no config.json): pass the timm model name"
        )
    head = source.state.get("head.weight")
    kwargs = dict(num_classes=int(head.shape[0]) if head is not None else 0) | kwargs
    model = timm.create_model(split_model_name_tag(name)[0], **kwargs)
    channels = input_channels(source.state, model)
    if "in_chans" not in kwargs and channels not in (None, input_channels(model.state_dict(), model)):
        model = timm.create_model(split_model_name_tag(name)[0], **kwargs, in_chans=channels)  # as trained
    try:
        state = convert_official_state_dict(source.state, model) if isinstance(model, CRATE) else source.state
    except InvalidError as error:
        raise InvalidError(f"{source.description}: {error}") from error
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        reason = " ".join(str(error).split())  # torch's message spans lines
        raise InvalidError(f"{source.description} does not fit {name}: {reason}") from error
    return model.eval(), name


def load_run(run: str | Path, checkpoint: str | Path | int | None = None, device="cpu") -> torch.nn.Module:
    """The model a `crate train` run folder trained, in eval mode on ``device``: built from its
    config.json (the model name, and in_chans, img_size and mask_ratio where the run set them; the
    class count and image channels are otherwise the checkpoint's) with the weights of its newest
    intact checkpoint, or of ``checkpoint`` (a checkpoint folder, one's name inside the run folder, or a
    step). Each checkpoint is checked against its sha256.json (crate/weights/checkpoint.py read_weights)."""
    run = Path(run)
    if not (run / "config.json").is_file():
        raise MissingError(
            f"{run} is not a run folder: expected {run / 'config.json'} and checkpoint-<step>/ folders, "
            "which crate train writes (other weights: crate.weights.sources.read_source and build_model)"
        )
    config = json.loads((run / "config.json").read_text())
    state, folder = read_weights(_checkpoint_in(run, checkpoint))
    overrides = {key: config[key] for key in ("in_chans", "img_size", "mask_ratio") if config.get(key)}
    model, _ = build_model(Source(state, config["model"], str(folder)), config["model"], **overrides)
    return model.to(device)


def _checkpoint_in(run: Path, checkpoint: str | Path | int | None) -> Path:
    if checkpoint is None:
        return run
    if isinstance(checkpoint, int):
        return step_folder(run, checkpoint)
    return Path(checkpoint) if Path(checkpoint).is_dir() else run / checkpoint
