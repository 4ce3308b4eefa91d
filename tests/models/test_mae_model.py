"""CRATE-MAE's released layout: load_released_mae_state_dict refuses a checkpoint that does not fit,
naming every problem, and leaves the model as it was. Numerical equality with the released model is
verification/test_mae.py's job."""

import re

import pytest
import torch

from crate.errors import InvalidError
from crate.models.mae import (
    CRATEMAE,
    CRATEMAEConfig,
    convert_released_mae_state_dict,
    load_released_mae_state_dict,
)
from reference.official_mae import random_official_mae_state_dict

SIZES = dict(dim=8, depth=2, heads=2, head_dim=4, patch_size=2, channels=1, num_patches=4)


def _model() -> CRATEMAE:
    return CRATEMAE(CRATEMAEConfig(img_size=(4, 4), patch_size=2, in_chans=1, dim=8, depth=2, heads=2))


def _released() -> dict[str, torch.Tensor]:
    return random_official_mae_state_dict(**SIZES, generator=torch.Generator().manual_seed(0))


def _refusal(state: dict) -> tuple[str, CRATEMAE, dict]:
    """The error message, the model and its state dict from before the refused load."""
    model = _model()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(InvalidError) as refused:
        load_released_mae_state_dict(model, state)
    return str(refused.value), model, before


def _assert_unchanged(model: CRATEMAE, before: dict) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], before[key]) for key in before)


def test_released_state_dict_loads_every_key():
    """The control: the released layout of the model's sizes loads, every released tensor in place
    (the release's unused pos_embed and decoder_embed dropped)."""
    model, released = _model(), _released()
    load_released_mae_state_dict(model, released)
    converted = convert_released_mae_state_dict(released)
    assert converted.keys() == model.state_dict().keys()
    assert torch.equal(
        model.decoder_blocks[1].linear.weight, released["decoder_blocks.1.layers.0.0.fn.weight"].float()
    )
    assert torch.equal(model.pos_embed, released["decoder_pos_embed"].float())


def test_missing_key_is_refused_by_name():
    state = _released()
    del state["decoder_blocks.0.layers.0.0.fn.weight"]
    message, model, before = _refusal(state)
    assert "missing decoder_blocks.0.linear.weight (8, 8)" in message
    _assert_unchanged(model, before)


def test_unexpected_key_of_the_layout_is_refused_by_name():
    """A third encoder layer in a two-layer model's checkpoint."""
    state = _released()
    state["blocks.2.layers.0.1.fn.weight"] = torch.zeros(8, 8, dtype=torch.float64)
    message, model, before = _refusal(state)
    assert "unexpected blocks.2.ista.weight" in message
    _assert_unchanged(model, before)


def test_key_outside_the_layout_is_refused_by_name():
    state = _released() | {"decoder_blocks.0.mlp.weight": torch.zeros(8, 8)}
    message, model, before = _refusal(state)
    assert "keys not in the released CRATE-MAE layout: ['decoder_blocks.0.mlp.weight']" in message
    _assert_unchanged(model, before)


def test_mis_shaped_key_is_refused_by_name():
    state = _released() | {"mask_token": torch.zeros(1, 1, 16, dtype=torch.float64)}
    message, model, before = _refusal(state)
    assert "mask_token: (1, 1, 16) in the checkpoint, (1, 1, 8) in the model" in message
    _assert_unchanged(model, before)


def test_every_problem_is_named_in_one_line():
    state = _released() | {
        "mask_token": torch.zeros(1, 1, 16),
        "blocks.2.layers.0.0.norm.bias": torch.zeros(8),
    }
    del state["decoder_pred.bias"]
    message, model, before = _refusal(state)
    assert "\n" not in message
    assert re.search(r"does not fit CRATEMAE \(8 wide, 2 layers\)", message)
    for problem in (
        "missing decoder_pred.bias (4,)",
        "unexpected blocks.2.norm1.bias",
        "mask_token: (1, 1, 16)",
    ):
        assert problem in message
    _assert_unchanged(model, before)
