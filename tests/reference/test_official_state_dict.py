"""reference.OfficialCRATE: the official layout (keys, shapes, parameter counts), loading, and the
errors for bad state dicts and bad images; the parameter counts and the exact widening of a
lower-precision state dict also for reference.OfficialCRATEAlpha (its other checks are in
test_reference_alpha.py)."""

import math

import pytest
import torch

import reference

SMALL = dict(dim=8, depth=2, heads=2, head_dim=4, patch_size=2, channels=3, num_patches=4, num_classes=5)


def _state(**overrides) -> dict:
    sizes = dict(SMALL, **overrides)
    return reference.random_official_state_dict(**sizes, generator=torch.Generator().manual_seed(0))


def _load(state: dict, **overrides) -> reference.OfficialCRATE:
    kwargs = dict(heads=SMALL["heads"], patch_size=SMALL["patch_size"], channels=SMALL["channels"])
    return reference.OfficialCRATE.from_state_dict(state, **dict(kwargs, **overrides))


def _released_sizes(dim: int, depth: int, heads: int, patch_size: int = 16, num_patches: int = 196) -> dict:
    return dict(
        dim=dim,
        depth=depth,
        heads=heads,
        head_dim=dim // heads,
        patch_size=patch_size,
        channels=3,
        num_patches=num_patches,
        num_classes=1000,
    )


# each family's reference model and the shapes of its released state dict
LAYOUTS = {
    "crate": (reference.OfficialCRATE, reference.official_state_dict_shapes),
    "crate_alpha": (reference.OfficialCRATEAlpha, reference.official_alpha_state_dict_shapes),
}
ALPHA_B16 = _released_sizes(768, 12, 12)
ALPHA_L14 = _released_sizes(1024, 24, 16, patch_size=14, num_patches=256)


@pytest.mark.parametrize(
    "family, sizes, expected",
    [
        ("crate", _released_sizes(384, 12, 6), 6_090_856),
        ("crate", _released_sizes(576, 12, 12), 13_116_328),
        ("crate", _released_sizes(768, 12, 12), 22_796_008),
        ("crate", _released_sizes(1024, 24, 16), 77_641_192),
        ("crate_alpha", ALPHA_B16, 72_328_936),
        ("crate_alpha", ALPHA_L14, 253_650_920),
    ],
    ids=["crate-T", "crate-S", "crate-B", "crate-L", "crate_alpha-B16", "crate_alpha-L14"],
)
def test_parameter_counts_equal_the_released_models(family, sizes, expected):
    """docs/architecture.md §3's table and the released CRATE-α ports (docs/crate-alpha.md §4), to the
    parameter: summed over the layout's shapes and read from the instantiated model (on the meta
    device, so that no float64 parameters are allocated)."""
    model_class, shapes = LAYOUTS[family]
    assert sum(math.prod(shape) for shape in shapes(**sizes).values()) == expected
    with torch.device("meta"):
        model = model_class(**sizes)
    assert sum(parameter.numel() for parameter in model.parameters()) == expected


def test_state_dict_round_trips_with_official_keys():
    state = _state()
    model = _load(state)
    assert list(model.state_dict()) == list(state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_single_head_of_full_width_has_no_output_projection():
    state = _state(heads=1, head_dim=8)
    assert not any("to_out" in key for key in state)
    model = _load(state, heads=1)
    assert isinstance(model.transformer.layers[0][0].fn.to_out, torch.nn.Identity)


@pytest.mark.parametrize("family", list(LAYOUTS))
def test_lower_precision_state_dict_is_widened_exactly(family):
    if family == "crate":
        state, load = _state(), _load
    else:
        generator = torch.Generator().manual_seed(0)
        state = reference.random_official_alpha_state_dict(**SMALL, generator=generator)

        def load(low: dict) -> reference.OfficialCRATEAlpha:
            return reference.OfficialCRATEAlpha.from_state_dict(low, heads=SMALL["heads"])

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        low = {key: value.to(dtype) for key, value in state.items()}
        model = load(low)
        assert all(p.dtype == torch.float64 for p in model.parameters())
        for key, value in model.state_dict().items():
            assert value.dtype == torch.float64 and torch.equal(value, low[key].double()), key


def test_sizes_are_read_from_the_shapes():
    model = _load(_state(depth=3, num_classes=7, num_patches=9))
    assert len(model.transformer.layers) == 3
    assert model.pos_embedding.shape == (1, 10, 8) and model.mlp_head[1].out_features == 7


def test_missing_key_is_named_with_its_expected_shape():
    state = _state()
    del state["transformer.layers.1.1.fn.weight"]
    with pytest.raises(
        ValueError, match=r"missing key 'transformer.layers.1.1.fn.weight' \(expected shape \(8, 8\)\)"
    ):
        _load(state)


def test_unexpected_key_is_named():
    state = dict(
        _state(), **{"transformer.layers.0.0.fn.to_out.1.weight": torch.zeros(3, dtype=torch.float64)}
    )
    with pytest.raises(ValueError, match=r"unexpected key 'transformer.layers.0.0.fn.to_out.1.weight'"):
        _load(state)


def test_wrong_shape_is_named_with_both_shapes():
    state = _state()
    state["transformer.layers.0.1.norm.bias"] = torch.zeros(9, dtype=torch.float64)
    with pytest.raises(
        ValueError, match=r"'transformer.layers.0.1.norm.bias' has shape \(9,\), expected \(8,\)"
    ):
        _load(state)


def test_wrong_patch_size_is_reported_on_the_patch_embedding():
    with pytest.raises(
        ValueError, match=r"'to_patch_embedding.2.weight' has shape \(8, 12\), expected \(8, 48\)"
    ):
        _load(_state(), patch_size=4)


def test_heads_that_do_not_divide_the_width_are_refused():
    with pytest.raises(ValueError, match="heads=3 does not divide the qkv width 8"):
        _load(_state(), heads=3)


def test_anchor_keys_are_required():
    state = _state()
    del state["cls_token"]
    with pytest.raises(KeyError, match="cls_token"):
        _load(state)


def test_integer_tensor_is_refused():
    state = _state()
    state["cls_token"] = torch.zeros(1, 1, 8, dtype=torch.int64)
    with pytest.raises(ValueError, match="'cls_token' must be a floating-point tensor"):
        _load(state)


@pytest.mark.parametrize(
    "images, error, message",
    [
        (torch.zeros(1, 3, 4, 4), TypeError, "images must be float64"),
        (torch.zeros(1, 1, 4, 4, dtype=torch.float64), ValueError, r"shape \(B, 3, H, W\)"),
        (torch.zeros(3, 4, 4, dtype=torch.float64), ValueError, r"shape \(B, 3, H, W\)"),
        (
            torch.zeros(1, 3, 5, 4, dtype=torch.float64),
            ValueError,
            "5×4 is not divisible by the patch size 2",
        ),
        (torch.zeros(1, 3, 6, 6, dtype=torch.float64), ValueError, "9 patches of 2×2, more than the 4"),
    ],
)
def test_bad_images_are_refused(images, error, message):
    with pytest.raises(error, match=message):
        _load(_state())(images)


def test_forward_shapes_and_intermediates():
    model = _load(_state())
    images = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    states = model.forward_intermediates(images)
    assert len(states) == 2 and all(s.input.shape == (3, 5, 8) for s in states)
    assert torch.equal(states[1].input, states[0].ista)
    assert all((s.ista >= 0).all() for s in states)
    assert torch.equal(model(images), model.head(states[-1].ista))
    assert model(images).shape == (3, 5)


def test_smaller_images_use_the_leading_position_embeddings():
    """As the official code: pos_embedding[:, :n+1] for an image with fewer patches."""
    model = _load(_state(num_patches=9))
    images = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    x = model.to_patch_embedding(images)
    expected = torch.cat([model.cls_token, x], dim=1) + model.pos_embedding[:, :5]
    assert torch.equal(model.embed(images), expected)


def test_mean_pool_averages_all_tokens_including_cls():
    state = _state()
    cls_model, mean_model = _load(state), _load(state, pool="mean")
    images = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    stream = cls_model.transformer(cls_model.embed(images))
    assert torch.equal(mean_model(images), mean_model.mlp_head(stream.mean(dim=1)))
    with pytest.raises(ValueError, match="pool must be 'cls' or 'mean'"):
        _load(state, pool="max")


def test_patchify_order_is_row_column_channel():
    """einops 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)', checked entry by entry against a loop."""
    images = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    patches = reference.patchify(images, 2)
    for b in range(2):
        for h in range(2):
            for w in range(3):
                for p1 in range(2):
                    for p2 in range(2):
                        for c in range(3):
                            expected = images[b, c, 2 * h + p1, 2 * w + p2]
                            assert patches[b, h * 3 + w, (p1 * 2 + p2) * 3 + c] == expected


def test_initialisation_follows_the_official_code():
    state = reference.random_official_state_dict(
        **dict(SMALL, dim=64, head_dim=32), generator=torch.Generator().manual_seed(0)
    )
    assert state["cls_token"].std() > 0.5  # standard normal, not 0.02
    assert state["transformer.layers.0.1.fn.weight"].abs().max() <= (6 / 64) ** 0.5
    assert state["transformer.layers.0.1.fn.weight"].abs().max() > 0.9 * (6 / 64) ** 0.5
    assert state["transformer.layers.0.0.fn.qkv.weight"].abs().max() <= 64**-0.5
    assert torch.equal(state["mlp_head.0.weight"], torch.ones(64, dtype=torch.float64))
