"""timm's model contract, applied to every registered CRATE and CRATE-α model as timm's own suite
(pytorch-image-models tests/test_models.py) applies it to its token-output transformers: forward,
backward with every parameter receiving a gradient, default-cfg consistency (the NON_STD_FILTERS
case: tokens out of forward_features, pre_logits, reset_classifier), forward_intermediates and the
features_only wrappers, pruning, TorchScript, FX forward and backward, FX then TorchScript, and the
models listed under a timm module named for them. That the traced and exported forms compute what
eager does, to a tolerance, is tests/test_deployment.py's job.

Cost: each registered configuration (width, heads, patch, dictionary ratio, channels, classes) at the
smallest image, 2×2 patches, and 3 layers, the fewest timm's feature tests accept; `-m slow` runs the
registered depths too.
"""

import math

import pytest
import timm
import torch
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models import FeatureInfo

import crate

NAMES = timm.list_models(module="crate")  # the classifiers; CRATE-MAE is module "crate_mae"
PATCH = {name: config["patch_size"] for name, config in (crate.VARIANTS | crate.ALPHA_VARIANTS).items()}


@pytest.fixture(params=NAMES)
def name(request) -> str:
    return request.param


@pytest.fixture(
    params=[pytest.param(3, id="depth3"), pytest.param(None, id="registered", marks=pytest.mark.slow)]
)
def create(request, name):
    """create(**kwargs) -> timm.create_model(name, ...) at 2×2 patches (3 layers but in the slow run)."""
    depth = {} if request.param is None else dict(depth=request.param)

    def create(**kwargs):
        return timm.create_model(name, img_size=2 * PATCH[name], **depth, **kwargs)

    return create


def _inputs(model, batch: int) -> torch.Tensor:
    embed = getattr(model, "model", model).patch_embed  # (FeatureGetterNet holds the model)
    return torch.randn(batch, embed.in_chans, *embed.img_size, generator=torch.Generator().manual_seed(0))


def _assert_all_parameters_have_gradients(model):
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert missing == [], f"no gradient for {missing}"


# -- the timm module ---------------------------------------------------------------------------------
def test_models_are_listed_under_the_timm_module_crate():
    assert "crate" in timm.list_modules()
    assert timm.list_models(module="crate") == NAMES
    assert sorted(NAMES) == sorted(crate.VARIANTS | crate.ALPHA_VARIANTS)
    assert timm.list_models(module="baselines") == ["vit_mini_patch4_28"]  # the demo's ViT, not a CRATE


# -- forward, backward, default cfg --------------------------------------------------------------------
def test_forward_and_grad_checkpointing(create):
    model = create().eval()
    images = _inputs(model, batch=1)
    outputs = model(images)
    assert outputs.shape == (1, model.num_classes) and not outputs.isnan().any()
    model.set_grad_checkpointing()
    assert torch.equal(model(images), outputs)  # checkpointing recomputes, it does not change the forward


def test_backward_reaches_every_parameter(create):
    model = create(num_classes=42).train()
    outputs = model(_inputs(model, batch=2))
    outputs.mean().backward()
    _assert_all_parameters_have_gradients(model)
    assert outputs.shape[-1] == 42 and not outputs.isnan().any()


def test_default_cfg_of_a_token_output_model(create, name):
    """timm's test_model_default_cfgs_non_std."""
    model = create().eval()
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    cfg, state = model.default_cfg, model.state_dict()
    images = _inputs(model, batch=1)
    features = model.forward_features(images)
    pre_logits = model.forward_head(features, pre_logits=True)
    assert features.ndim == 3 and features.shape[-1] == model.num_features
    assert features.shape[1] == model.patch_embed.num_patches + model.num_prefix_tokens
    assert pre_logits.shape == (1, model.head_hidden_size)

    model.reset_classifier(0)
    assert model.num_classes == 0
    outputs = model(images)
    assert outputs.shape == pre_logits.shape == (1, model.head_hidden_size)
    assert torch.equal(outputs, pre_logits)
    assert create(num_classes=0).eval()(images).shape == (1, model.num_features)

    assert cfg["classifier"] + ".weight" in state and cfg["num_classes"] == state["head.weight"].shape[0]
    assert cfg["first_conv"] + ".weight" in state
    assert cfg["input_size"] == timm.get_pretrained_cfg_value(name, "input_size")
    assert cfg["input_size"][0] == model.patch_embed.in_chans == len(cfg["mean"]) == len(cfg["std"])


def test_reset_classifier_changes_the_head_and_the_pooling(create):
    model = create().eval()
    model.reset_classifier(7, global_pool="avg")
    assert model.get_classifier().out_features == 7 and model.global_pool == "mean"
    features = model.forward_features(_inputs(model, batch=2))
    assert torch.equal(model.forward_head(features, pre_logits=True), model.fc_norm(features.mean(dim=1)))


# -- intermediates, features_only, pruning ---------------------------------------------------------------
def _assert_feature_maps(outputs, channels, reductions, input_size, batch, output_fmt="NCHW"):
    feat_axis, spatial_axis = get_channel_dim(output_fmt), get_spatial_dim(output_fmt)
    assert len(outputs) == len(channels)
    for c, r, o in zip(channels, reductions, outputs, strict=True):
        assert o.shape[feat_axis] == c and o.shape[0] == batch and not o.isnan().any()
        for axis, size in zip(spatial_axis, input_size[-2:], strict=True):
            assert o.shape[axis] <= math.ceil(size / r) + 1


def test_forward_intermediates(create):
    """timm's test_model_forward_intermediates."""
    model = create().eval()
    info = FeatureInfo(model.feature_info, len(model.feature_info))
    assert len(info.channels()) >= 3
    images = _inputs(model, batch=1)
    output, intermediates = model.forward_intermediates(images, output_fmt="NCHW")
    _assert_feature_maps(intermediates, info.channels(), info.reduction(), images.shape, batch=1)
    assert torch.equal(output, model.forward_features(images))
    model.set_grad_checkpointing()
    assert torch.equal(model.forward_intermediates(images, output_fmt="NCHW")[0], output)


@pytest.mark.parametrize("feature_cls", [None, "getter"])
def test_features_only(create, feature_cls):
    """timm's test_model_forward_intermediates_features (feature_cls="getter", the default here)."""
    model = create(features_only=True, **({"feature_cls": feature_cls} if feature_cls else {})).eval()
    images = _inputs(model, batch=1)
    outputs = model(images)
    info = model.feature_info
    _assert_feature_maps(outputs, info.channels(), info.reduction(), images.shape, batch=1)


def test_prune_intermediate_layers_keeps_the_intermediates(create):
    full = create().eval()
    pruned = create().eval()
    pruned.load_state_dict(full.state_dict())
    images = _inputs(full, batch=1)
    take = pruned.prune_intermediate_layers([0, 1])
    assert take == [0, 1] and len(pruned.blocks) == 2 and pruned.num_classes == 0
    kept = pruned.forward_intermediates(images, indices=take, intermediates_only=True)
    expected = full.forward_intermediates(images, indices=take, intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(kept, expected, strict=True))
    assert torch.equal(
        pruned.forward_features(images), full.forward_intermediates(images, [1], stop_early=True)[0]
    )

    features = create(features_only=True, out_indices=(0, 1)).eval()  # the getter prunes the rest
    assert len(features.model.blocks) == 2 and len(features(images)) == 2
