"""timm's first-layer adaptation for weights of another channel count (crate/models/released.py
adapt_input_channels), as timm's test_model_load_pretrained loads RGB weights into in_chans=1 models:
both families, this project's layout (fine-tuning), the released layouts and timm's pretrained path,
and `crate train --finetune` of an RGB source on grayscale digits."""

import logging

import pytest
import timm
import timm.data
import torch
from safetensors.torch import save_file
from timm.models import adapt_input_conv

import crate
import reference
from crate.errors import InvalidError
from crate.train import build_model, main, resolve_config
from crate.weights import sources
from tests.helpers import MINI, latest_weights

FAMILIES = ["crate_mini_patch4_28", "crate_alpha_mini_patch4_28"]


def rgb_model(name: str) -> torch.nn.Module:
    """A 3-channel model of ``name``, its patch LayerNorm's scale and shift drawn (not the identity
    they start as), so that folding them into proj is tested."""
    model = timm.create_model(name, in_chans=3).eval()
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if "norm_in" in key:
                parameter.normal_(generator=torch.Generator().manual_seed(len(key)))
    return model


def expected_first_layer(source: dict, in_chans: int, patch: int = 4) -> torch.Tensor:
    """timm's adapt_input_conv of the source's first layer: the conv itself (CRATE-α), or CRATE's
    Linear on (row, column, channel) patches, its LayerNorm's scale folded in, read as a conv."""
    weight = source["patch_embed.proj.weight"]
    if weight.dim() == 4:
        return adapt_input_conv(in_chans, weight)
    folded = weight * source["patch_embed.norm_in.weight"]
    conv = folded.reshape(len(weight), patch, patch, 3).permute(0, 3, 1, 2)
    return adapt_input_conv(in_chans, conv).permute(0, 2, 3, 1).reshape(len(weight), -1)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("in_chans", [1, 2, 4])
def test_rgb_weights_fine_tune_a_model_of_other_channels(name, in_chans):
    source = rgb_model(name)
    model = timm.create_model(name, in_chans=in_chans, num_classes=5).eval()
    report = sources.load_for_finetuning(model, sources.Source(source.state_dict(), name, "an RGB model"))
    assert torch.equal(model.patch_embed.proj.weight, expected_first_layer(source.state_dict(), in_chans))
    assert report.adapted == [
        f"patch_embed.proj adapted from 3 to {in_chans} input channels as timm does "
        + ("(summed over RGB)" if in_chans == 1 else f"(RGB repeated, scaled by 3/{in_chans})")
    ]
    assert report.adapted[0] in str(report)
    assert model(torch.randn(2, in_chans, 28, 28)).shape == (2, 5)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_channel_computes_what_the_rgb_model_does_on_the_gray_image_replicated(name):
    source = rgb_model(name)
    model = timm.create_model(name, in_chans=1).eval()
    sources.load_for_finetuning(model, sources.Source(source.state_dict(), name, "an RGB model"))
    gray = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_features(gray), source.forward_features(gray.expand(-1, 3, -1, -1))
        )


@pytest.mark.parametrize(
    "name, released",
    [
        ("crate_mini_patch4_28", reference.random_official_state_dict),
        ("crate_alpha_mini_patch4_28", reference.random_official_alpha_state_dict),
    ],
)
def test_released_rgb_checkpoints_load_into_one_channel(name, released):
    state = released(**(MINI | dict(channels=3)), num_classes=10, generator=torch.Generator().manual_seed(1))
    state = {key: value.float() for key, value in state.items()}
    rgb = crate.convert_official_state_dict(state)
    model = timm.create_model(name, in_chans=1)
    crate.load_official_state_dict(model, state)  # strict: was "has shape (…, 3, 4, 4), expects (…, 1, 4, 4)"
    assert torch.equal(model.patch_embed.proj.weight, expected_first_layer(rgb, 1))
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("name", ["crate_tiny_patch16_224", "crate_alpha_tiny_patch16_224"])
def test_timm_pretrained_rgb_weights_for_in_chans_1(name, tmp_path, caplog):
    source = rgb_model(name)
    file = tmp_path / "rgb.safetensors"
    save_file(source.state_dict(), file)
    overlay = dict(file=str(file))
    with caplog.at_level(logging.INFO, "timm"):
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, in_chans=1).eval()
    assert torch.equal(model.patch_embed.proj.weight, expected_first_layer(source.state_dict(), 1, patch=16))
    assert "Loading unchanged" not in caplog.text and "random init" not in caplog.text  # timm's own step
    gray = torch.randn(1, 1, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(gray), source(gray.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)
    assert timm.data.resolve_data_config({}, model=model)["input_size"] == (1, 224, 224)


def test_a_224_model_with_in_chans_1_reads_one_channel_images():
    model = timm.create_model("crate_alpha_tiny_patch16_224", in_chans=1)
    config = timm.data.resolve_data_config({}, model=model)
    assert config["input_size"] == (1, 224, 224)  # timm's cfg said (3, 224, 224)
    assert config["mean"] == pytest.approx((0.449,), abs=1e-3) and len(config["std"]) == 1


def test_weights_of_one_channel_are_not_stretched_to_rgb():
    name = "crate_alpha_mini_patch4_28"
    source = sources.Source(timm.create_model(name, in_chans=1).state_dict(), name, "a gray model")
    with pytest.raises(
        InvalidError, match=r"reads 1 image channels, the model 3: .*build the model with in_chans=1"
    ):
        sources.load_for_finetuning(timm.create_model(name, in_chans=3), source)


def test_an_rgb_source_fine_tunes_on_grayscale_digits_from_the_command_line(tmp_path):
    source = rgb_model("crate_mini_patch4_28")
    file = tmp_path / "rgb.safetensors"
    save_file(source.state_dict(), file)
    argv = ["--finetune", str(file), "--model", "crate_mini_patch4_28", "--dataset", "digits"]
    argv += ["--epochs", "1", "--max-steps", "1", "--batch-size", "16", "--lr-batch", "16", "--skip-verify"]
    main([*argv, "--telemetry-batch", "0", "--eval-subset", "16", "--output", str(tmp_path / "run")])
    note = (tmp_path / "run" / "finetune.txt").read_text()
    assert "patch_embed.proj adapted from 3 to 1 input channels" in note
    assert latest_weights(tmp_path / "run")["patch_embed.norm_in.weight"].shape == (
        16,
    )  # 4·4 patches, 1 channel


def test_in_chans_builds_the_model_for_that_many_channels(tmp_path):
    file = tmp_path / "rgb.safetensors"
    save_file(rgb_model("crate_alpha_mini_patch4_28").state_dict(), file)
    config = resolve_config(
        ["--finetune", str(file), "--model", "crate_alpha_mini_patch4_28", "--in-chans", "2"]
    )
    model = build_model(config, num_classes=10)
    assert model.patch_embed.proj.in_channels == 2
    assert "from 3 to 2 input channels" in str(model.finetune_report)
