"""CRATE-α's interface: the timm registry and its published weights (the Hub path tested offline, on a
prepared local Hugging Face cache), configuration and input errors, released-checkpoint conversion.
The timm method contract is shared with CRATE (tests/models/test_model.py); numerical equality with the
reference is verification/test_fast_model.py's job (its "-alpha" cases)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch

import crate
import reference
from crate import CRATE, CRATEAlpha, CRATEAlphaConfig, CRATEConfig, load_official_state_dict
from crate.models.alpha import HUB_ID, IN21K_CLASSES, PRETRAINED

RELEASED_COUNTS = {  # parameters of the instantiated released port (docs/crate-alpha.md §4)
    "crate_alpha_base_patch16_224": 72_328_936,
    "crate_alpha_large_patch14_224": 253_650_920,
}
SMALL = CRATEAlphaConfig(img_size=8, patch_size=2, in_chans=3, num_classes=5, dim=16, depth=3, heads=2)
REPOSITORY = Path(__file__).resolve().parents[2]


def _sizes(config: CRATEAlphaConfig, num_classes: int | None = None) -> dict:
    height, width = crate.models.layers.pair(config.img_size)
    return dict(
        dim=config.dim,
        depth=config.depth,
        heads=config.heads,
        head_dim=config.dim // config.heads,
        patch_size=config.patch_size,
        channels=config.in_chans,
        num_patches=(height // config.patch_size) * (width // config.patch_size),
        num_classes=config.num_classes if num_classes is None else num_classes,
        ratio=config.dictionary_ratio,
    )


def _released_state(config: CRATEAlphaConfig = SMALL, seed: int = 0, dtype=torch.float32, **kwargs) -> dict:
    state = reference.random_official_alpha_state_dict(
        **_sizes(config, **kwargs), generator=torch.Generator().manual_seed(seed)
    )
    return {key: value.to(dtype) for key, value in state.items()}


def _images(config: CRATEAlphaConfig = SMALL, batch: int = 2) -> torch.Tensor:
    size = crate.models.layers.pair(config.img_size)
    return torch.randn(batch, config.in_chans, *size, generator=torch.Generator().manual_seed(1))


# -- registry -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(RELEASED_COUNTS))
def test_parameter_counts_equal_the_released_models(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert isinstance(model, CRATEAlpha)
    assert sum(p.numel() for p in model.parameters()) == RELEASED_COUNTS[name]


@pytest.mark.parametrize("name", list(crate.ALPHA_VARIANTS))
def test_every_variant_is_registered_with_a_default_cfg(name):
    assert name in timm.list_models("crate_alpha_*")
    cfg = timm.get_pretrained_cfg(name).to_dict()
    for field in ("input_size", "mean", "std", "crop_pct", "interpolation", "first_conv", "classifier"):
        assert cfg[field] is not None, field
    assert len(cfg["mean"]) == cfg["input_size"][0] == len(cfg["std"])
    with torch.device("meta"):
        model = timm.create_model(name)
    variant = crate.ALPHA_VARIANTS[name]
    assert (model.config.patch_size, model.config.dim, len(model.blocks), model.config.heads) == (
        variant["patch_size"],
        variant["dim"],
        variant["depth"],
        variant["heads"],
    )
    assert model.blocks[0].odl.D.shape == (variant["dim"], 4 * variant["dim"])


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


def test_small_grayscale_variant_runs_on_fashion_mnist_sized_images():
    model = timm.create_model("crate_alpha_mini_patch4_28")
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    features = timm.create_model("crate_alpha_mini_patch4_28", features_only=True, out_indices=(1, 5))
    assert [tuple(f.shape) for f in features(torch.randn(2, 1, 28, 28))] == [(2, 128, 7, 7)] * 2


def test_create_model_honours_timm_arguments():
    model = timm.create_model(
        "crate_alpha_tiny_patch16_224", num_classes=10, in_chans=1, img_size=64, drop_path_rate=0.2
    )
    assert model.patch_embed.proj.in_channels == 1 and model.patch_embed.grid_size == (4, 4)
    assert model.blocks[-1].drop_path.probability == pytest.approx(0.2)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 10)


# -- configuration and input errors ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(dictionary_ratio=0), ValueError, "dictionary_ratio must be >= 1, got 0"),
        (dict(dim=10, heads=3), ValueError, "dim=10 is not divisible by heads=3"),
        (dict(mlp_ratio=4.0), TypeError, r"CRATEAlpha got unexpected arguments \['mlp_ratio'\]"),
    ],
)
def test_bad_configurations_are_refused(overrides, error, message):
    with pytest.raises(error, match=message):
        CRATEAlpha(SMALL, **overrides)


def test_bad_images_are_refused_naming_the_model():
    with pytest.raises(
        ValueError, match=r"CRATEAlpha expects images of shape \(B, 3, 8, 8\), got \(2, 1, 8, 8\)"
    ):
        CRATEAlpha(SMALL)(torch.zeros(2, 1, 8, 8))
    with pytest.raises(TypeError, match=r"CRATEAlpha expects floating-point images, got torch\.uint8"):
        CRATEAlpha(SMALL)(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


# -- released checkpoints ---------------------------------------------------------------------------
def test_released_state_dict_loads_strictly_and_gives_the_reference_logits():
    state = _released_state(dtype=torch.float64)
    model = CRATEAlpha(SMALL).double()
    load_official_state_dict(model, state)
    expected = reference.OfficialCRATEAlpha.from_state_dict(state, heads=2)(_images().double())
    assert torch.allclose(model(_images().double()), expected, rtol=0, atol=1e-12)


def test_a_checkpoint_of_the_other_family_is_refused_by_name():
    crate_config = CRATEConfig(img_size=8, patch_size=2, in_chans=3, num_classes=5, dim=16, depth=3, heads=2)
    crate_sizes = {key: value for key, value in _sizes(SMALL).items() if key != "ratio"}
    crate_state = {
        key: value.float() for key, value in reference.random_official_state_dict(**crate_sizes).items()
    }
    with pytest.raises(ValueError, match=r"a released CRATE checkpoint does not fit CRATEAlpha"):
        load_official_state_dict(CRATEAlpha(SMALL), crate_state)
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
        load_official_state_dict(CRATEAlpha(SMALL), state)


def test_position_embedding_is_resampled_for_another_image_size():
    state = _released_state()  # 4×4 patch grid
    model = CRATEAlpha(SMALL, img_size=12)  # 6×6 patch grid
    load_official_state_dict(model, state)
    assert model.pos_embed.shape == (1, 37, 16)
    assert torch.equal(model.pos_embed[:, 0], state["pos_embedding"][:, 0])  # the cls position is kept


def test_timm_loads_a_released_file_and_adapts_the_head(tmp_path):
    config = crate.alpha_variant_config("crate_alpha_mini_patch4_28")
    path = tmp_path / "crate_alpha_mini.pth"
    torch.save(_released_state(config), path)
    overlay = dict(file=str(path))
    model = timm.create_model("crate_alpha_mini_patch4_28", pretrained=True, pretrained_cfg_overlay=overlay)
    expected = CRATEAlpha(config)
    load_official_state_dict(expected, torch.load(path, weights_only=True))
    assert torch.equal(model(_images(config)), expected(_images(config)))
    three_classes = timm.create_model(
        "crate_alpha_mini_patch4_28", pretrained=True, pretrained_cfg_overlay=overlay, num_classes=3
    )
    assert three_classes.head.out_features == 3
    assert torch.equal(three_classes.blocks[5].odl.D1, expected.blocks[5].odl.D1)


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
    shapes = reference.official_alpha_state_dict_shapes(**_sizes(config, num_classes=num_classes))
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
    environment = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), PYTHONPATH=str(REPOSITORY))
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
