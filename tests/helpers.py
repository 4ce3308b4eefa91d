"""What more than one file of tests/ uses: the fast training options, a run's latest weights, a Python
subprocess run from the repository root, and the two model families the interface tests are
parametrized over (as verification/precision.py's Family is for the property tests)."""

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import reference
from crate import CRATE, CRATEAlpha, CRATEAlphaConfig, CRATEConfig
from crate.models.layers import pair
from crate.train import TrainConfig, resolve_config
from crate.weights import checkpoint

ROOT = Path(__file__).resolve().parent.parent

# a fixed subset and a small model keep each run to seconds on 2 cores
FAST = [
    "--train-subset",
    "1024",
    "--eval-subset",
    "512",
    "--batch-size",
    "64",
    "--lr-batch",
    "64",
    "--telemetry-batch",
    "8",
    "--log-every",
    "2",
]


def fast_config(output: Path, *extra: str) -> TrainConfig:
    """The fast options, then ``extra``, writing to ``output``."""
    return resolve_config([*FAST, "--output", str(output), *extra])


def latest_weights(folder: Path) -> dict:
    """The model tensors of a run folder's latest checkpoint."""
    return load_file(checkpoint.latest(folder) / "model.safetensors")


# the released layout's sizes of crate_alpha_mini_patch4_28 (and crate_mini_patch4_28), classes aside
MINI = dict(dim=128, depth=6, heads=4, head_dim=32, patch_size=4, channels=1, num_patches=49)


def released_alpha_pth(path: Path, num_classes: int = 10, seed: int = 1) -> dict:
    """A random crate_alpha_mini_patch4_28-sized state dict in the release's layout, saved to ``path``
    in float32; returns it in float64 as drawn."""
    state = reference.random_official_alpha_state_dict(
        **MINI, num_classes=num_classes, generator=torch.Generator().manual_seed(seed)
    )
    torch.save({key: value.float() for key, value in state.items()}, path)
    return state


def run_python(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    """``python *args`` from the repository root, one OpenMP thread, stdout and stderr together."""
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)) | (env or {})
    return subprocess.Popen(
        [sys.executable, *args],
        env=environment,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


@dataclass(frozen=True)
class Family:
    """What a test needs to know of a model family (CRATE or CRATE-α): the model and configuration
    classes, the Fashion-MNIST demo model's registered name, a random released-layout state dict
    (``random_state(**sizes, generator=...)``; CRATE-α's sizes add ``ratio``) and the float64 reference
    read from one (``make_reference(state, heads, patch_size, channels)``), the parameter holding a
    block's dictionary and the name of the released layout in error messages."""

    name: str
    model_class: type
    config_class: type
    mini: str
    random_state: Callable[..., dict]
    make_reference: Callable[..., torch.nn.Module]
    dictionary: str
    layout: str

    def sizes(self, config: CRATEConfig, num_classes: int | None = None) -> dict:
        """The released-layout sizes of ``config`` (with another class count if given)."""
        height, width = pair(config.img_size)
        sizes = dict(
            dim=config.dim,
            depth=config.depth,
            heads=config.heads,
            head_dim=config.dim // config.heads,
            patch_size=config.patch_size,
            channels=config.in_chans,
            num_patches=(height // config.patch_size) * (width // config.patch_size),
            num_classes=config.num_classes if num_classes is None else num_classes,
        )
        if self.config_class is CRATEAlphaConfig:
            sizes["ratio"] = config.dictionary_ratio
        return sizes

    def released_state(
        self, config: CRATEConfig, seed: int = 0, dtype=torch.float32, num_classes: int | None = None
    ) -> dict:
        """A random released-layout state dict for ``config``, in ``dtype``."""
        state = self.random_state(
            **self.sizes(config, num_classes), generator=torch.Generator().manual_seed(seed)
        )
        return {key: value.to(dtype) for key, value in state.items()}


CRATE_FAMILY = Family(
    name="crate",
    model_class=CRATE,
    config_class=CRATEConfig,
    mini="crate_mini_patch4_28",
    random_state=reference.random_official_state_dict,
    make_reference=lambda state, heads, patch_size, channels: reference.OfficialCRATE.from_state_dict(
        state, heads=heads, patch_size=patch_size, channels=channels
    ),
    dictionary="ista.weight",
    layout="CRATE",
)
ALPHA_FAMILY = Family(
    name="crate_alpha",
    model_class=CRATEAlpha,
    config_class=CRATEAlphaConfig,
    mini="crate_alpha_mini_patch4_28",
    random_state=reference.random_official_alpha_state_dict,
    make_reference=lambda state, heads, patch_size, channels: reference.OfficialCRATEAlpha.from_state_dict(
        state, heads=heads
    ),
    dictionary="odl.D1",
    layout="CRATE-α",
)
FAMILIES = {family.name: family for family in (CRATE_FAMILY, ALPHA_FAMILY)}
# a test parametrized over both families, with ids "crate" and "crate_alpha"
BOTH_FAMILIES = pytest.mark.parametrize("family", list(FAMILIES.values()), ids=list(FAMILIES))
