"""The suite's pytest options, registered by the root conftest.py: ``--crate-device`` runs the
device-parametrized tests on that device only, ``--crate-model`` runs the layer-shape tests at that
registered model's layer shapes and for its family only. Without them the suite is as it always was:
cpu plus cuda where present, CRATE-T's layer shapes, both families.

The test modules read the choice when they are imported, at collection, after ``configure`` has
stored it; the ids of the default run do not change.
"""

from dataclasses import dataclass

import pytest
import torch

from crate import ALPHA_VARIANTS, VARIANTS, alpha_variant_config
from verification.precision import ALPHA_FAMILY, CRATE_FAMILY, CRATE_T_LAYER

DEVICES = ("cpu", "cuda")
MODELS = VARIANTS | ALPHA_VARIANTS  # the timm names that `import crate` registers


@dataclass(frozen=True)
class Choice:
    device: str | None = None
    model: str | None = None


_choice = Choice()


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("crate", "CRATE's verification suite (verification/README.md)")
    group.addoption(
        "--crate-device",
        choices=DEVICES,
        help="run the device-parametrized tests on this device only (default: cpu, and cuda where present)",
    )
    group.addoption(
        "--crate-model",
        metavar="NAME",
        help="a registered crate_* or crate_alpha_* model: the layer-shape tests run at its layer shapes, "
        "for its family only (default: CRATE-T's layer shapes, both families)",
    )


def configure(config: pytest.Config) -> None:
    """Check the options (a pytest.UsageError names a bad value and the choices) and store them."""
    global _choice
    choice = Choice(config.getoption("crate_device"), config.getoption("crate_model"))
    if choice.device == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--crate-device cuda: no CUDA GPU is available (torch.cuda.is_available())")
    if choice.model is not None and choice.model not in MODELS:
        raise pytest.UsageError(
            f"--crate-model {choice.model}: not a registered CRATE model; choose one of {', '.join(MODELS)}"
        )
    _choice = choice


def report_header() -> list[str]:
    """The header lines of a run with options (none by default, so the default output is unchanged)."""
    lines = []
    if _choice.device:
        lines.append(f"--crate-device {_choice.device}: the device-parametrized tests run on it only")
    if _choice.model:
        shapes = ", ".join(f"{key}={value}" for key, value in layer_shapes().items())
        lines.append(f"--crate-model {_choice.model}: the {family()} family's layer tests at {shapes}")
    return lines


def devices() -> list[str]:
    return [_choice.device] if _choice.device else list(DEVICES)


def on_device(device: str, *values):
    """A parameter set of ``values`` (the device among them) for a test on ``device``: skipped on cuda
    without a GPU, or when --crate-device cpu keeps the tests off it."""
    marks = needs_cuda() if device == "cuda" else ()
    return pytest.param(*values, marks=marks)


def needs_cuda() -> pytest.MarkDecorator:
    if _choice.device == "cpu":
        return pytest.mark.skip(reason="--crate-device cpu")
    return pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def family() -> str | None:
    """The chosen model's family name ("crate" or "alpha"), None without --crate-model."""
    if _choice.model is None:
        return None
    return (ALPHA_FAMILY if _choice.model in ALPHA_VARIANTS else CRATE_FAMILY).name


def layer_shapes(model: str | None = None) -> dict:
    """The problem fields of one layer of ``model`` (default: the chosen one, else CRATE-T's layer):
    tokens (img/patch)² + 1, heads, head_dim = dim/heads, and for CRATE-α ``overcomplete``, its
    dictionary ratio m/d."""
    model = model or _choice.model
    if model is None:
        return CRATE_T_LAYER
    config = MODELS[model]
    height, width = config["img_size"]
    tokens = (height // config["patch_size"]) * (width // config["patch_size"]) + 1
    shapes = CRATE_T_LAYER | dict(
        tokens=tokens, heads=config["heads"], head_dim=config["dim"] // config["heads"]
    )
    if model in ALPHA_VARIANTS:
        shapes["overcomplete"] = alpha_variant_config(model).dictionary_ratio
    return shapes
