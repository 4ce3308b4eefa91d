"""The fast models' interface (CRATE; the timm contract also for CRATE-α, whose own checks are in
tests/models/test_alpha_model.py): timm integration, configuration errors, checkpoint conversion and
loading, the timm method contract, torch.compile and bf16 autocast. Numerical equality with the
reference is verification/test_fast_model.py's job."""

import pytest
import timm
import timm.optim
import torch

import crate
import reference
from crate import (
    CRATE,
    CRATEAlpha,
    CRATEAlphaConfig,
    CRATEConfig,
    convert_official_state_dict,
    load_official_state_dict,
)

OFFICIAL_COUNTS = {
    "crate_tiny_patch16_224": 6_090_856,
    "crate_small_patch16_224": 13_116_328,
    "crate_base_patch16_224": 22_796_008,
    "crate_large_patch16_224": 77_641_192,
}
SMALL = CRATEConfig(img_size=8, patch_size=2, in_chans=3, num_classes=5, dim=16, depth=3, heads=2)


def _official_state(config: CRATEConfig = SMALL, seed: int = 0, dtype=torch.float32) -> dict:
    sizes = dict(
        dim=config.dim,
        depth=config.depth,
        heads=config.heads,
        head_dim=config.dim // config.heads,
        patch_size=config.patch_size,
        channels=config.in_chans,
        num_patches=(crate.models.layers.pair(config.img_size)[0] // config.patch_size) ** 2,
        num_classes=config.num_classes,
    )
    state = reference.random_official_state_dict(**sizes, generator=torch.Generator().manual_seed(seed))
    return {key: value.to(dtype) for key, value in state.items()}


def _images(config: CRATEConfig = SMALL, batch: int = 2) -> torch.Tensor:
    size = crate.models.layers.pair(config.img_size)
    return torch.randn(batch, config.in_chans, *size, generator=torch.Generator().manual_seed(1))


# -- registry --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(OFFICIAL_COUNTS))
def test_parameter_counts_equal_the_official_models(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_COUNTS[name]


@pytest.mark.parametrize("name", list(crate.VARIANTS))
def test_every_variant_is_registered_with_a_default_cfg(name):
    assert name in timm.list_models("crate_*")
    cfg = timm.get_pretrained_cfg(name).to_dict()
    for field in ("input_size", "mean", "std", "crop_pct", "interpolation", "first_conv", "classifier"):
        assert cfg[field] is not None, field
    assert len(cfg["mean"]) == cfg["input_size"][0] == len(cfg["std"])


def test_the_demo_model_reads_out_the_mean_token():
    model = timm.create_model("crate_mini_patch7_28").eval()
    assert model.patch_embed.grid_size == (4, 4) and model.global_pool == "mean"
    tokens = model.forward_features(torch.randn(2, 1, 28, 28))  # (B, 1 + 16, d)
    assert tokens.shape == (2, 17, 128)
    torch.testing.assert_close(model.forward_head(tokens), model.head(model.fc_norm(tokens.mean(1))))
    assert timm.create_model("crate_mini_patch7_28", global_pool="token").global_pool == "cls"


def test_create_model_honours_timm_arguments():
    model = timm.create_model(
        "crate_tiny_patch16_224",
        num_classes=10,
        in_chans=1,
        img_size=64,
        global_pool="avg",
        drop_rate=0.1,
        drop_path_rate=0.2,
    )
    assert model.config.num_classes == 10 and model.config.in_chans == 1
    assert model.patch_embed.grid_size == (4, 4) and model.global_pool == "mean"
    assert model.blocks[-1].drop_path.probability == pytest.approx(0.2)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 10)


def test_small_grayscale_variant_runs_on_fashion_mnist_sized_images():
    model = timm.create_model("crate_mini_patch4_28")
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_features_only_returns_every_requested_layer_as_feature_maps():
    model = timm.create_model("crate_mini_patch4_28", features_only=True, out_indices=(1, 3, 5))
    features = model(torch.randn(2, 1, 28, 28))
    assert [tuple(f.shape) for f in features] == [(2, 128, 7, 7)] * 3
    assert model.feature_info.channels() == [128] * 3


# -- configuration and input errors -----------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(dim=10, heads=3), "dim=10 is not divisible by heads=3"),
        (dict(img_size=10, patch_size=4), "img_size=10×10 is not divisible by patch_size=4"),
        (dict(pool="max"), r"global_pool must be one of \['avg', 'cls', 'mean', 'token'\], got 'max'"),
        (dict(depth=0), "must be >= 1"),
    ],
)
def test_bad_configurations_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        CRATE(SMALL, **overrides)


def test_unknown_argument_is_named():
    with pytest.raises(TypeError, match=r"unexpected arguments \['mlp_ratio'\]"):
        CRATE(SMALL, mlp_ratio=4.0)


@pytest.mark.parametrize(
    "images, error, message",
    [
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), TypeError, "floating-point images, got torch.uint8"),
        (torch.zeros(2, 1, 8, 8), ValueError, r"shape \(B, 3, 8, 8\), got \(2, 1, 8, 8\)"),
        (torch.zeros(2, 3, 16, 16), ValueError, r"got \(2, 3, 16, 16\)"),
        (torch.zeros(3, 8, 8), ValueError, r"got \(3, 8, 8\)"),
    ],
)
def test_bad_images_are_refused(images, error, message):
    with pytest.raises(error, match=message):
        CRATE(SMALL)(images)


# -- official checkpoints ---------------------------------------------------------------------------
def test_official_state_dict_loads_strictly_and_gives_the_reference_logits():
    state = _official_state(dtype=torch.float64)
    model = CRATE(SMALL).double()
    load_official_state_dict(model, state)
    expected = reference.OfficialCRATE.from_state_dict(state, heads=2, patch_size=2, channels=3)(
        _images().double()
    )
    assert torch.allclose(model(_images().double()), expected, rtol=0, atol=1e-12)


def test_training_checkpoint_wrappers_are_unwrapped():
    state = {"epoch": 3, "state_dict": {"module." + key: value for key, value in _official_state().items()}}
    model = CRATE(SMALL)
    load_official_state_dict(model, state)
    assert torch.equal(
        model.blocks[1].ista.weight, state["state_dict"]["module.transformer.layers.1.1.fn.weight"]
    )


def test_converted_state_dict_passes_through_unchanged():
    converted = convert_official_state_dict(_official_state())
    assert convert_official_state_dict(converted).keys() == converted.keys()


def test_mismatched_checkpoint_names_the_keys():
    state = _official_state(CRATEConfig(**{**SMALL.__dict__, "depth": 2}))
    with pytest.raises(ValueError, match=r"does not fit CRATE(.|\n)*missing key 'blocks\.2\.ista\.weight'"):
        load_official_state_dict(CRATE(SMALL), state)
    wrong_width = _official_state(CRATEConfig(**{**SMALL.__dict__, "dim": 8, "heads": 2}))
    with pytest.raises(
        ValueError, match=r"'cls_token' has shape \(1, 1, 8\), the model expects \(1, 1, 16\)"
    ):
        load_official_state_dict(CRATE(SMALL), wrong_width)


def test_unknown_official_key_is_named():
    state = dict(_official_state(), **{"transformer.layers.0.2.fn.weight": torch.zeros(1)})
    with pytest.raises(
        ValueError, match=r"not in the released CRATE layout: \['transformer.layers.0.2.fn.weight'\]"
    ):
        convert_official_state_dict(state)


def test_position_embedding_is_resampled_for_another_image_size():
    state = _official_state()  # 4×4 patch grid
    model = CRATE(SMALL, img_size=12)  # 6×6 patch grid
    load_official_state_dict(model, state)
    assert model.pos_embed.shape == (1, 37, 16)
    assert torch.equal(model.pos_embed[:, 0], state["pos_embedding"][:, 0])  # the cls position is kept


def test_timm_loads_an_official_checkpoint_file(tmp_path):
    path = tmp_path / "crate_mini.pth"
    config = crate.variant_config("crate_mini_patch4_28")
    torch.save(_official_state(config), path)
    model = timm.create_model(
        "crate_mini_patch4_28", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))
    )
    expected = CRATE(config)
    load_official_state_dict(expected, torch.load(path, weights_only=True))
    images = _images(config)
    assert torch.equal(model(images), expected(images))


# -- timm's method contract, for both families ----------------------------------------------------------
SMALL_ALPHA = CRATEAlphaConfig(**SMALL.__dict__)
FAMILIES = {"crate": (CRATE, SMALL), "crate_alpha": (CRATEAlpha, SMALL_ALPHA)}


@pytest.fixture(params=list(FAMILIES))
def build(request):
    """build(**overrides) -> a small CRATE or CRATE-α."""
    model_class, config = FAMILIES[request.param]
    return lambda **overrides: model_class(config, **overrides)


def test_forward_is_forward_features_then_forward_head(build):
    model = build().eval()
    images = _images()
    features = model.forward_features(images)
    assert features.shape == (2, 17, 16)
    assert torch.equal(model(images), model.forward_head(features))
    assert model.forward_head(features, pre_logits=True).shape == (2, 16)


def test_forward_intermediates_follows_timm(build):
    model = build().eval()
    images = _images()
    final, maps = model.forward_intermediates(images)
    assert torch.equal(final, model.forward_features(images))
    assert [tuple(m.shape) for m in maps] == [(2, 16, 4, 4)] * 3
    tokens = model.forward_intermediates(images, indices=[0, -1], output_fmt="NLC", intermediates_only=True)
    assert [tuple(t.shape) for t in tokens] == [(2, 16, 16)] * 2
    with_prefix = model.forward_intermediates(
        images, indices=1, return_prefix_tokens=True, intermediates_only=True
    )
    assert tuple(with_prefix[0][1].shape) == (2, 1, 16)
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(images, indices=[3])


def test_layer_states_carry_mssa_ista_and_attention(build):
    model = build().eval()
    states = model.forward_intermediates(
        _images(), intermediates_only=True, return_layer_states=True, return_attention=True
    )
    assert len(states) == 3 and torch.equal(states[1].input, states[0].ista)
    for state, block in zip(states, model.blocks, strict=True):
        assert torch.equal(state.mssa, block.compress(state.input))
        assert torch.equal(state.ista, block.sparsify(state.mssa))
    attention = states[0].attention
    assert attention.shape == (2, 2, 17, 17)
    assert torch.allclose(attention.sum(-1), torch.ones(2, 2, 17), atol=1e-6)


def test_crate_layer_outputs_are_non_negative():
    """CRATE's ISTA has no residual, so every layer output is a ReLU output (CRATE-α's has one)."""
    states = CRATE(SMALL).forward_intermediates(_images(), intermediates_only=True, return_layer_states=True)
    assert all((s.ista >= 0).all() for s in states)


def test_prune_intermediate_layers_keeps_what_is_needed(build):
    model = build()
    kept = model.prune_intermediate_layers([1], prune_head=True)
    assert kept == [1] and len(model.blocks) == 2 and isinstance(model.head, torch.nn.Identity)


def test_classifier_reset_and_parameter_groups(build):
    model = build()
    model.reset_classifier(7, global_pool="avg")
    assert model.get_classifier().out_features == 7 and model.global_pool == "mean"
    assert (model.config.num_classes, model.config.pool) == (7, "mean")
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    assert len(optimizer.param_groups) > 2


def test_gradient_checkpointing_gives_the_same_gradients(build):
    model = build()
    images = _images()

    def gradients():
        model.zero_grad()
        model(images).square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = gradients()
    model.set_grad_checkpointing()
    for a, b in zip(plain, gradients(), strict=True):
        assert torch.equal(a, b)  # the recomputed forward is the same computation


def test_every_parameter_receives_a_gradient(build):
    model = build()
    model(_images()).square().sum().backward()
    assert [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()] == []


def test_drop_path_is_random_in_training_only(build):
    model = build(drop_path_rate=0.5)
    images = _images(batch=8)
    model.train()
    torch.manual_seed(0)
    first = model(images)
    assert not torch.equal(first, model(images))
    model.eval()
    assert torch.equal(model(images), model(images))


def test_fused_attention_is_used_only_without_autograd(build):
    """SDPA in inference (fast), the explicit path under autograd (see crate.models.layers.MSSA)."""
    model = build().eval()
    explicit = build(fused_attn=False).eval()
    explicit.load_state_dict(model.state_dict())
    images = _images()
    with torch.no_grad():
        assert torch.allclose(model(images), explicit(images), atol=1e-5)
    assert torch.equal(model(images), explicit(images))  # grad enabled: the same explicit code path


def test_compiled_model_matches_eager(build):
    model = build().eval()
    images = _images()
    compiled = torch.compile(model)
    with torch.no_grad():
        assert torch.allclose(compiled(images), model(images), rtol=1e-5, atol=1e-5)


def test_bf16_autocast_runs_on_cpu(build):
    model = build().eval()
    images = _images()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(images)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
