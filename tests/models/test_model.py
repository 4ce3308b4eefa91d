"""The fast models' interface, both families (CRATE and CRATE-α, parametrized where a check is the same
for both): the timm registry (CRATE-α's published weights, the Hub path tested offline on a prepared
local Hugging Face cache), configuration and input errors, released-checkpoint conversion and
loading, the timm method contract, torch.compile and bf16 autocast. Numerical equality with the
reference is verification/test_fast_model.py's job (its "-alpha" cases for CRATE-α)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

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
from crate.models.alpha import HUB_ID, IN21K_CLASSES, PRETRAINED
from tests.helpers import ALPHA_FAMILY, BOTH_FAMILIES, CRATE_FAMILY, FAMILIES, ROOT

PUBLISHED_COUNTS = {
    # the official CRATE models
    "crate_tiny_patch16_224": 6_090_856,
    "crate_small_patch16_224": 13_116_328,
    "crate_base_patch16_224": 22_796_008,
    "crate_large_patch16_224": 77_641_192,
    # parameters of the instantiated released CRATE-α port (docs/crate-alpha.md §4)
    "crate_alpha_base_patch16_224": 72_328_936,
    "crate_alpha_large_patch14_224": 253_650_920,
}
SMALL = CRATEConfig(img_size=8, patch_size=2, in_chans=3, num_classes=5, dim=16, depth=3, heads=2)
SMALL_ALPHA = CRATEAlphaConfig(**SMALL.__dict__)
SMALL_CONFIGS = {CRATE_FAMILY.name: SMALL, ALPHA_FAMILY.name: SMALL_ALPHA}


def _official_state(config: CRATEConfig = SMALL, seed: int = 0, dtype=torch.float32) -> dict:
    return CRATE_FAMILY.released_state(config, seed, dtype)


def _released_state(config: CRATEAlphaConfig = SMALL_ALPHA, seed: int = 0, dtype=torch.float32) -> dict:
    return ALPHA_FAMILY.released_state(config, seed, dtype)


def _images(config: CRATEConfig = SMALL, batch: int = 2) -> torch.Tensor:
    size = crate.models.layers.pair(config.img_size)
    return torch.randn(batch, config.in_chans, *size, generator=torch.Generator().manual_seed(1))


def _family_of(name: str):
    return ALPHA_FAMILY if name.startswith("crate_alpha_") else CRATE_FAMILY


# -- registry --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PUBLISHED_COUNTS))
def test_parameter_counts_equal_the_published_models(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert type(model) is _family_of(name).model_class
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_COUNTS[name]


@pytest.mark.parametrize("name", [*crate.VARIANTS, *crate.ALPHA_VARIANTS])
def test_every_variant_is_registered_with_a_default_cfg(name):
    family = _family_of(name)
    assert name in timm.list_models("crate_alpha_*" if family is ALPHA_FAMILY else "crate_*")
    cfg = timm.get_pretrained_cfg(name).to_dict()
    for field in ("input_size", "mean", "std", "crop_pct", "interpolation", "first_conv", "classifier"):
        assert cfg[field] is not None, field
    assert len(cfg["mean"]) == cfg["input_size"][0] == len(cfg["std"])
    with torch.device("meta"):
        model = timm.create_model(name)
    variant = {**crate.VARIANTS, **crate.ALPHA_VARIANTS}[name]
    assert type(model) is family.model_class
    assert (model.config.patch_size, model.config.dim, len(model.blocks), model.config.heads) == (
        variant["patch_size"],
        variant["dim"],
        variant["depth"],
        variant["heads"],
    )
    if family is ALPHA_FAMILY:
        assert model.blocks[0].odl.D.shape == (variant["dim"], 4 * variant["dim"])
    else:
        assert model.blocks[0].ista.weight.shape == (variant["dim"], variant["dim"])


def test_published_weights_are_tagged_and_the_fine_tuned_ones_are_the_default():
    published = set(timm.list_pretrained("crate_alpha_*"))
    assert published == {f"{name}.{tag}" for name, tags in PRETRAINED.items() for tag in tags}
    for name in ("crate_alpha_base_patch16_224", "crate_alpha_large_patch14_224"):
        default = timm.get_pretrained_cfg(name)
        assert (default.tag, default.hf_hub_id, default.num_classes) == ("in21k_ft_in1k", HUB_ID, 1000)
        assert default.crop_pct == 0.875 and default.license == "apache-2.0"
        assert timm.get_pretrained_cfg(f"{name}.in21k").num_classes == IN21K_CLASSES
    assert (
        timm.get_pretrained_cfg("crate_alpha_base_patch16_224").hf_hub_filename == "torch/crate_alpha_B16.pth"
    )
    assert (
        timm.get_pretrained_cfg("crate_alpha_large_patch14_224").hf_hub_filename
        == "torch/crate_alpha_L14.pth"
    )


def test_the_demo_model_reads_out_the_mean_token():
    model = timm.create_model("crate_mini_patch7_28").eval()
    assert model.patch_embed.grid_size == (4, 4) and model.global_pool == "mean"
    tokens = model.forward_features(torch.randn(2, 1, 28, 28))  # (B, 1 + 16, d)
    assert tokens.shape == (2, 17, 128)
    torch.testing.assert_close(model.forward_head(tokens), model.head(model.fc_norm(tokens.mean(1))))
    assert timm.create_model("crate_mini_patch7_28", global_pool="token").global_pool == "cls"


@BOTH_FAMILIES
def test_create_model_honours_timm_arguments(family):
    name = {"crate": "crate_tiny_patch16_224", "crate_alpha": "crate_alpha_tiny_patch16_224"}[family.name]
    model = timm.create_model(
        name,
        num_classes=10,
        in_chans=1,
        img_size=64,
        global_pool="avg",
        drop_rate=0.1,
        drop_path_rate=0.2,
    )
    assert type(model) is family.model_class
    assert model.config.num_classes == 10 and model.config.in_chans == 1
    assert model.patch_embed.grid_size == (4, 4) and model.global_pool == "mean"
    if family is ALPHA_FAMILY:  # CRATE-α embeds patches with a Conv2d, CRATE with a Linear
        assert model.patch_embed.proj.in_channels == 1
    assert model.blocks[-1].drop_path.probability == pytest.approx(0.2)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 10)


@BOTH_FAMILIES
def test_small_grayscale_variant_runs_on_fashion_mnist_sized_images(family):
    model = timm.create_model(family.mini)
    assert type(model) is family.model_class
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    features = timm.create_model(family.mini, features_only=True, out_indices=(1, 5))
    assert [tuple(f.shape) for f in features(torch.randn(2, 1, 28, 28))] == [(2, 128, 7, 7)] * 2


def test_features_only_returns_every_requested_layer_as_feature_maps():
    model = timm.create_model("crate_mini_patch4_28", features_only=True, out_indices=(1, 3, 5))
    features = model(torch.randn(2, 1, 28, 28))
    assert [tuple(f.shape) for f in features] == [(2, 128, 7, 7)] * 3
    assert model.feature_info.channels() == [128] * 3


# -- configuration and input errors -----------------------------------------------------------------
BOTH_FAMILIES_CONFIGURATIONS = [
    (dict(dim=10, heads=3), ValueError, "dim=10 is not divisible by heads=3"),
    (dict(img_size=10, patch_size=4), ValueError, "img_size=10×10 is not divisible by patch_size=4"),
    (
        dict(pool="max"),
        ValueError,
        r"global_pool must be one of \['avg', 'cls', 'mean', 'token'\], got 'max'",
    ),
    (dict(depth=0), ValueError, "must be >= 1"),
    (dict(mlp_ratio=4.0), TypeError, r"{model} got unexpected arguments \['mlp_ratio'\]"),
]
FAMILY_CONFIGURATIONS = [
    ("crate", dict(dictionary_ratio=4), TypeError, r"CRATE got unexpected arguments \['dictionary_ratio'\]"),
    ("crate_alpha", dict(dictionary_ratio=0), ValueError, "dictionary_ratio must be >= 1, got 0"),
]


@pytest.mark.parametrize(
    "family_name, overrides, error, message",
    [(name, *case) for case in BOTH_FAMILIES_CONFIGURATIONS for name in FAMILIES] + FAMILY_CONFIGURATIONS,
)
def test_bad_configurations_are_refused(family_name, overrides, error, message):
    family = FAMILIES[family_name]
    with pytest.raises(error, match=message.format(model=family.model_class.__name__)):
        family.model_class(SMALL_CONFIGS[family_name], **overrides)


@BOTH_FAMILIES
@pytest.mark.parametrize(
    "images, error, message",
    [
        (
            torch.zeros(2, 3, 8, 8, dtype=torch.uint8),
            TypeError,
            r"{model} expects floating-point images, got torch\.uint8",
        ),
        (
            torch.zeros(2, 1, 8, 8),
            ValueError,
            r"{model} expects images of shape \(B, 3, 8, 8\), got \(2, 1, 8, 8\)",
        ),
        (torch.zeros(2, 3, 16, 16), ValueError, r"{model} expects images .*got \(2, 3, 16, 16\)"),
        (torch.zeros(3, 8, 8), ValueError, r"{model} expects images .*got \(3, 8, 8\)"),
    ],
)
def test_bad_images_are_refused_naming_the_model(family, images, error, message):
    with pytest.raises(error, match=message.format(model=family.model_class.__name__)):
        family.model_class(SMALL_CONFIGS[family.name])(images)


# -- released checkpoints ---------------------------------------------------------------------------
@BOTH_FAMILIES
def test_released_state_dict_loads_strictly_and_gives_the_reference_logits(family):
    config = SMALL_CONFIGS[family.name]
    state = family.released_state(config, dtype=torch.float64)
    model = family.model_class(config).double()
    load_official_state_dict(model, state)
    expected = family.make_reference(state, heads=2, patch_size=2, channels=3)(_images().double())
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


@BOTH_FAMILIES
def test_position_embedding_is_resampled_for_another_image_size(family):
    config = SMALL_CONFIGS[family.name]
    state = family.released_state(config)  # 4×4 patch grid
    model = family.model_class(config, img_size=12)  # 6×6 patch grid
    load_official_state_dict(model, state)
    assert model.pos_embed.shape == (1, 37, 16)
    assert torch.equal(model.pos_embed[:, 0], state["pos_embedding"][:, 0])  # the cls position is kept


@BOTH_FAMILIES
def test_timm_loads_a_released_file_and_adapts_the_head(family, tmp_path):
    config = (crate.alpha_variant_config if family is ALPHA_FAMILY else crate.variant_config)(family.mini)
    path = tmp_path / f"{family.mini}.pth"
    torch.save(family.released_state(config), path)
    overlay = dict(file=str(path))
    model = timm.create_model(family.mini, pretrained=True, pretrained_cfg_overlay=overlay)
    expected = family.model_class(config)
    load_official_state_dict(expected, torch.load(path, weights_only=True))
    assert torch.equal(model(_images(config)), expected(_images(config)))
    three_classes = timm.create_model(
        family.mini, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=3
    )
    assert three_classes.head.out_features == 3
    dictionary = f"blocks.5.{family.dictionary}"
    assert torch.equal(three_classes.state_dict()[dictionary], expected.state_dict()[dictionary])
    kept = three_classes.state_dict()
    for key, value in expected.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(kept[key], value), key


def test_a_checkpoint_of_the_other_family_is_refused_by_name():
    crate_config = CRATEConfig(img_size=8, patch_size=2, in_chans=3, num_classes=5, dim=16, depth=3, heads=2)
    crate_sizes = {key: value for key, value in ALPHA_FAMILY.sizes(SMALL_ALPHA).items() if key != "ratio"}
    crate_state = {
        key: value.float() for key, value in reference.random_official_state_dict(**crate_sizes).items()
    }
    with pytest.raises(ValueError, match=r"a released CRATE checkpoint does not fit CRATEAlpha"):
        load_official_state_dict(CRATEAlpha(SMALL_ALPHA), crate_state)
    with pytest.raises(ValueError, match=r"a released CRATE-α checkpoint does not fit CRATE \(16 wide"):
        load_official_state_dict(CRATE(crate_config), _released_state())


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda s: s.pop("transformer.layers.2.1.fn.D1"),
            r"missing key 'blocks\.2\.odl\.D1' \(shape \(16, 64\)\)",
        ),
        (
            lambda s: s.update({"transformer.layers.0.1.fn.D": torch.zeros(16, 48)}),
            r"'blocks\.0\.odl\.D' has shape \(16, 48\), the model expects \(16, 64\)",
        ),
        (
            lambda s: s.update({"transformer.layers.0.0.fn.to_out.0.bias": torch.zeros(16)}),
            r"unexpected key 'blocks\.0\.attn\.proj\.bias'",
        ),
        (
            lambda s: s.update({"transformer.layers.0.2.fn.D": torch.zeros(1)}),
            r"keys not in the released CRATE-α layout: \['transformer\.layers\.0\.2\.fn\.D'\]",
        ),
    ],
)
def test_conversion_is_strict_and_names_each_problem(edit, message):
    state = _released_state()
    edit(state)
    with pytest.raises(ValueError, match=message):
        load_official_state_dict(CRATEAlpha(SMALL_ALPHA), state)


# -- the Hugging Face Hub, offline ------------------------------------------------------------------
def _hub_cache(root: Path, files: dict[str, dict]) -> Path:
    """A local Hugging Face cache holding UCSC-VLAA/CRATE-alpha at one revision with ``files``."""
    repo = root / "models--UCSC-VLAA--CRATE-alpha"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name, state in files.items():
        path = repo / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
    return root


def _base_state(num_classes: int, seed: int) -> dict:
    """A B/16-shaped released state dict in bf16 (half the bytes; the model widens it exactly)."""
    config = crate.alpha_variant_config("crate_alpha_base_patch16_224")
    shapes = reference.official_alpha_state_dict_shapes(**ALPHA_FAMILY.sizes(config, num_classes))
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=generator).to(torch.bfloat16) for key, shape in shapes.items()}


def test_published_weights_load_from_the_hub_cache_offline(tmp_path):
    """timm.create_model(name, pretrained=True) resolves the Hub file (the ImageNet-21K one by its prefix
    in the folder's listing), loads it with HF_HUB_OFFLINE=1 from a prepared cache, and converts it.
    A subprocess, so that huggingface_hub reads the offline setting and the cache path at import."""
    in21k_name = "torch/in21k_Pretrain/B16_in21k_fixed_decouple_x4_91e_checkpoint.pth"
    cache = _hub_cache(
        tmp_path / "hub",
        {
            "torch/crate_alpha_B16.pth": _base_state(1000, seed=0),
            in21k_name: _base_state(IN21K_CLASSES, seed=1),
            "torch/in21k_Pretrain/B8_in21k_fixed_decouple_x4_91e_checkpoint.pth": {},  # another variant's
        },
    )
    script = textwrap.dedent(
        f"""
        import timm, torch, crate
        from crate.models.alpha import IN21K_CLASSES
        for tag, file, seed, classes in [
            ("", "torch/crate_alpha_B16.pth", 0, 1000),
            (".in21k", "{in21k_name}", 1, IN21K_CLASSES),
        ]:
            model = timm.create_model("crate_alpha_base_patch16_224" + tag, pretrained=True)
            assert model.pretrained_cfg["hf_hub_filename"] == file, model.pretrained_cfg
            assert model.head.out_features == classes
            state = torch.load(
                timm.models._hub.hf_hub_download("UCSC-VLAA/CRATE-alpha", file), weights_only=True
            )
            expected = crate.convert_official_state_dict(state, model)
            for key, value in model.state_dict().items():
                assert torch.equal(value, expected[key].float()), key
        print("loaded both")
        """
    )
    environment = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=300
    )
    assert result.returncode == 0 and "loaded both" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize(
    "listing, message",
    [
        ([], r"expected one file torch/in21k_Pretrain/L14_\*\.pth .* found none"),
        (
            ["torch/in21k_Pretrain/L14_a.pth", "torch/in21k_Pretrain/L14_b.pth"],
            r"found \['torch/in21k_Pretrain/L14_a\.pth', 'torch/in21k_Pretrain/L14_b\.pth'\]",
        ),
    ],
)
def test_an_ambiguous_or_missing_hub_file_is_refused_with_the_fix(monkeypatch, listing, message):
    monkeypatch.setattr(crate.models.crate, "_hub_listing", lambda: (listing, "a test listing"))
    with pytest.raises(FileNotFoundError, match=message + r"(.|\n)*hf_hub_filename=\.\.\.(.|\n)*file=\.\.\."):
        timm.create_model("crate_alpha_large_patch14_224.in21k", pretrained=True)


# -- timm's method contract, for both families ----------------------------------------------------------


@pytest.fixture(params=list(FAMILIES))
def build(request):
    """build(**overrides) -> a small CRATE or CRATE-α."""
    model_class, config = FAMILIES[request.param].model_class, SMALL_CONFIGS[request.param]
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


class _ExportProbe(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1 if crate.models.layers.exporting() else x - 1


def test_export_is_told_from_compile_on_every_torch(monkeypatch):
    """crate.models.layers.exporting(): False in eager and under torch.compile, True under torch.export.
    torch.compiler.is_exporting() answered True under torch.compile too before torch 2.14
    (pytorch#176347: compiled training then left the Triton kernel and symmetric_attention); that
    answer is played here by is_compiling, which is what the older dynamo returned for it (through a
    function of its own: 2.14's dynamo answers for whatever the name torch.compiler.is_exporting holds)."""
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: torch.compiler.is_compiling())
    x, probe = torch.zeros(2), _ExportProbe()
    assert probe(x).tolist() == [-1.0, -1.0]
    assert torch.compile(probe, backend="eager", fullgraph=True)(x).tolist() == [-1.0, -1.0]
    assert torch.export.export(probe, (x,)).module()(x).tolist() == [1.0, 1.0]


def test_bf16_autocast_runs_on_cpu(build):
    model = build().eval()
    images = _images()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(images)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
