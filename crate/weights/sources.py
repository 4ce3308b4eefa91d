"""Where a model's weights come from, for `crate train --finetune SOURCE`, `crate eval SOURCE` and
`crate audit SOURCE`.

SOURCE is one of:
- a run folder (its config.json names the model; the latest checkpoint is read);
- a checkpoint folder (model.safetensors; the run's config.json one level up names the model);
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
from safetensors.torch import load_file
from timm.models import split_model_name_tag

from ..errors import InvalidError, MissingError
from ..models import CRATE, convert_official_state_dict
from ..models.crate import MODELS
from ..models.hub import require_hub_weights
from ..models.released import fit_problems, resample_to_model
from . import checkpoint

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
    if (path / "config.json").is_file():
        path = checkpoint.latest(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise MissingError(f"no checkpoint at {path} (expected a run folder, a checkpoint folder or a file)")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise InvalidError(f"{path}: not a weights file (expected one of {', '.join(WEIGHT_SUFFIXES)})")
    try:
        state = (
            load_file(path)
            if path.suffix == ".safetensors"
            else torch.load(path, map_location="cpu", weights_only=True)
        )
    except Exception as error:  # safetensors, pickle and zip each raise their own types
        raise InvalidError(
            f"{path} cannot be read as a state dict: {type(error).__name__}: {error}"
        ) from error
    if not isinstance(state, dict):
        raise InvalidError(f"{path} holds a {type(state).__name__}, not a state dict")
    return Source(convert_official_state_dict(state), model_name, str(path))


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

    def __str__(self) -> str:
        lines = [f"fine-tuning from {self.source}: {self.loaded} tensors loaded"]
        lines += [f"  not loaded: {key}: {why}" for key, why in self.not_loaded.items()]
        lines += [f"  {note}" for note in self.resampled]
        return "\n".join(lines)


def classifier_prefix(model: torch.nn.Module) -> str:
    """The classifier's module name ("head" for CRATE and timm's ViTs), from timm's pretrained cfg."""
    name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    return name[0] if isinstance(name, (tuple, list)) else name


def load_for_finetuning(model: torch.nn.Module, source: Source) -> LoadReport:
    """Load every tensor of ``model`` except its classifier from ``source``, strictly: a missing,
    unexpected or mis-shaped key raises a ValueError naming each. The classifier keeps its fresh
    initialisation (the new task's classes); a position embedding of another patch grid is resampled."""
    report = LoadReport(source.description)
    head = classifier_prefix(model) + "."
    state = {key: value for key, value in source.state.items()}
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
    problems = fit_problems(state, model, head)
    if problems:
        raise InvalidError(
            f"{source.description} does not fit {type(model).__name__}: every tensor but the classifier "
            "must load\n  " + "\n  ".join(problems)
        )
    model.load_state_dict(state, strict=False)
    report.loaded = len(state)
    return report


def build_model(source: Source, model_name: str | None = None, **kwargs) -> tuple[torch.nn.Module, str]:
    """(model with the source's weights loaded strictly, head included, in eval mode; its name): the
    architecture is ``model_name``, else the one the source names; the class count is the source's."""
    name = model_name or source.model_name
    if name is None:
        raise InvalidError(
            f"{source.description} names no architecture (no config.json): pass the timm model name"
        )
    head = source.state.get("head.weight")
    model = timm.create_model(
        split_model_name_tag(name)[0], num_classes=int(head.shape[0]) if head is not None else 0, **kwargs
    )
    state = convert_official_state_dict(source.state, model) if isinstance(model, CRATE) else source.state
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise InvalidError(f"{source.description} does not fit {name}: {error}") from error
    return model.eval(), name
