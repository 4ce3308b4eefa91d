"""dynamic_img_size=True, as timm's ViTs have it, for both families: a model built for 32 px runs on
images of any size its patch divides and gives the output of a model built for that size whose
position embedding is the first one's resampled (timm's resample_abs_pos_embed, bicubic, the cls
token kept); at its own size it is the fixed-size model. Without the flag another size keeps its error."""

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

import crate  # noqa: F401  (registers crate_* and crate_alpha_*)
from crate.errors import InvalidError
from tests.helpers import BOTH_FAMILIES


def _config(family, img_size, **overrides):
    return family.config_class(
        img_size=img_size, patch_size=8, in_chans=3, num_classes=5, dim=16, depth=2, heads=2, **overrides
    )


def _images(height: int, width: int) -> torch.Tensor:
    return torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))


@BOTH_FAMILIES
@pytest.mark.parametrize("height, width", [(48, 48), (32, 48), (16, 24)])
def test_a_dynamic_model_is_the_model_built_for_the_size_with_the_resampled_embedding(family, height, width):
    torch.manual_seed(0)
    dynamic = family.model_class(_config(family, 32, dynamic_img_size=True)).eval()
    fixed = family.model_class(_config(family, (height, width))).eval()
    state = dynamic.state_dict()
    state["pos_embed"] = resample_abs_pos_embed(
        state["pos_embed"], [height // 8, width // 8], [4, 4], num_prefix_tokens=1
    )
    fixed.load_state_dict(state)
    images = _images(height, width)
    with torch.no_grad():
        torch.testing.assert_close(dynamic(images), fixed(images), rtol=0, atol=1e-6)
        (grid,) = dynamic.forward_intermediates(images, indices=[-1], intermediates_only=True)
    assert grid.shape == (2, 16, height // 8, width // 8)
    assert dynamic.pos_embed.shape == (1, 17, 16)  # the parameter keeps its grid


@BOTH_FAMILIES
def test_at_its_own_size_a_dynamic_model_is_the_fixed_one(family):
    torch.manual_seed(0)
    dynamic = family.model_class(_config(family, 32, dynamic_img_size=True)).eval()
    fixed = family.model_class(_config(family, 32)).eval()
    fixed.load_state_dict(dynamic.state_dict())
    images = _images(32, 32)
    with torch.no_grad():
        assert torch.equal(dynamic(images), fixed(images))


@BOTH_FAMILIES
def test_timm_create_model_takes_dynamic_img_size(family):
    model = timm.create_model(family.mini, dynamic_img_size=True).eval()
    assert model.dynamic_img_size and not model.patch_embed.strict_img_size
    with torch.no_grad():
        assert model(torch.randn(1, 1, 56, 40)).shape == (1, 10)


@BOTH_FAMILIES
def test_another_size_without_the_flag_and_a_size_the_patch_does_not_divide_are_explained(family):
    fixed = family.model_class(_config(family, 32)).eval()
    name = family.model_class.__name__
    with pytest.raises(
        InvalidError, match=rf"{name} expects images of shape \(B, 3, 32, 32\), got \(2, 3, 48, 48\)"
    ):
        fixed(_images(48, 48))
    with pytest.raises(InvalidError, match="or with dynamic_img_size=True for any size"):
        fixed(_images(48, 48))
    dynamic = family.model_class(_config(family, 32, dynamic_img_size=True)).eval()
    with pytest.raises(InvalidError, match=r"multiples of patch_size=8, got 50×48; resize or pad them"):
        dynamic(_images(50, 48))
    with pytest.raises(InvalidError, match=r"expects images of shape \(B, 3, 32, 32\), got \(2, 1, 48, 48\)"):
        dynamic(torch.randn(2, 1, 48, 48))  # the channels still checked
