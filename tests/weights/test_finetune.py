"""Fine-tuning from trained weights (crate/weights/sources.py, `crate train --finetune SOURCE`): every source
kind, strict loading of everything but the classifier with a note of what was not loaded, position
embeddings resampled, --freeze (a linear probe leaves every other tensor bit-identical), layer-wise
lr decay, and the transfer preset."""

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image, ImageOps
from safetensors.torch import save_file

import crate
import reference
from crate.train import ConfigError, build_model, resolve_config, train
from crate.train.setup import transforms
from crate.weights import checkpoint, sources
from tests.helpers import latest_weights

DIGITS_FAST = ["--dataset", "digits", "--batch-size", "32", "--lr-batch", "32", "--epochs", "2"]
QUIET = ["--telemetry-batch", "0", "--log-every", "1000"]


# -- sources ---------------------------------------------------------------------------------------------
def test_every_source_kind_reads_the_same_weights(trained_run, tmp_path):
    run, _ = trained_run
    weights = latest_weights(run)
    file = tmp_path / "weights.safetensors"
    save_file(weights, file)
    for source, name in [
        (run, "crate_mini_patch4_28"),  # a run folder: its config.json names the model
        (checkpoint.latest(run), "crate_mini_patch4_28"),  # a checkpoint folder
        (file, None),  # a bare file names no architecture
    ]:
        read = sources.read_source(source)
        assert read.model_name == name == sources.source_model_name(source)
        assert read.state.keys() == weights.keys()
        assert all(torch.equal(read.state[key], weights[key]) for key in weights)


def test_a_released_pth_is_converted_and_a_timm_name_is_understood(tmp_path):
    config = crate.variant_config("crate_mini_patch4_28")
    sizes = dict(dim=128, depth=6, heads=4, head_dim=32, patch_size=4, channels=1, num_patches=49)
    released = reference.random_official_state_dict(**sizes, num_classes=10)
    released = {key: value.float() for key, value in released.items()}
    torch.save(released, tmp_path / "crate_mini.pth")
    read = sources.read_source(tmp_path / "crate_mini.pth")
    assert read.model_name is None and "blocks.5.ista.weight" in read.state
    crate.CRATE(config).load_state_dict(read.state)  # this project's names, strictly
    assert sources.source_model_name("crate_alpha_base_patch16_224.in21k") == "crate_alpha_base_patch16_224"
    with pytest.raises(ValueError, match=r"has no published weights .*timm\.list_pretrained"):
        sources.read_source("crate_mini_patch4_28")


@pytest.mark.parametrize(
    "content, error, message",
    [
        (None, FileNotFoundError, r"neither a file or folder .* nor a timm model name"),
        (b"not a checkpoint", ValueError, r"missing.pth is not a readable PyTorch state dict"),
    ],
)
def test_a_bad_source_is_named_with_what_was_expected(tmp_path, content, error, message):
    path = tmp_path / "missing.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(error, match=message):
        sources.read_source(path)


# -- loading for fine-tuning -------------------------------------------------------------------------------
def test_everything_but_the_classifier_loads_and_the_note_says_why(trained_run):
    run, _ = trained_run
    model = timm.create_model("crate_mini_patch4_28", num_classes=7)
    fresh_head = model.head.weight.clone()
    report = sources.load_for_finetuning(model, sources.read_source(run))
    weights = latest_weights(run)
    for key, value in model.state_dict().items():
        if key.startswith("head."):
            continue
        assert torch.equal(value, weights[key]), key
    assert torch.equal(model.head.weight, fresh_head) and model.head.out_features == 7
    assert set(report.not_loaded) == {"head.weight", "head.bias"}
    assert "replaced by a new one for the task's 7 classes" in report.not_loaded["head.weight"]
    assert report.loaded == len(weights) - 2 and f"{report.loaded} tensors loaded" in str(report)


def test_a_source_that_does_not_fit_is_refused_naming_each_key(trained_run):
    run, _ = trained_run
    source = sources.read_source(run)
    source.state.pop("blocks.0.ista.weight")
    source.state["blocks.0.extra"] = torch.zeros(1)
    source.state["fc_norm.weight"] = torch.zeros(64)
    with pytest.raises(
        ValueError, match=r"does not fit CRATE: every tensor but the classifier must load"
    ) as info:
        sources.load_for_finetuning(timm.create_model("crate_mini_patch4_28"), source)
    message = str(info.value)
    assert "missing key 'blocks.0.ista.weight'" in message and "unexpected key 'blocks.0.extra'" in message
    assert "'fc_norm.weight' has shape (64,), the model expects (128,)" in message


@pytest.mark.parametrize("name", ["crate_mini_patch4_28", "crate_alpha_mini_patch4_28", "vit_mini_patch4_28"])
def test_position_embeddings_are_resampled_for_another_image_size(name):
    source = timm.create_model(name)
    model = timm.create_model(name, img_size=36)  # a 9×9 patch grid instead of 7×7
    report = sources.load_for_finetuning(model, sources.Source(source.state_dict(), name, "a test model"))
    assert model.pos_embed.shape[1] == 82 and "from 50 to 82 positions" in report.resampled[0]
    assert torch.equal(model.pos_embed[:, 0], source.pos_embed[:, 0])  # the cls position is kept
    assert model(torch.randn(2, 1, 36, 36)).shape == (2, 10)


# -- crate train --finetune ---------------------------------------------------------------------------------
def test_the_model_comes_from_the_source_unless_named(trained_run):
    run, _ = trained_run
    assert resolve_config(["--finetune", str(run)]).model == "crate_mini_patch4_28"
    assert resolve_config(["--finetune", str(run), "--model", "crate_alpha_mini_patch4_28"]).model == (
        "crate_alpha_mini_patch4_28"
    )


def test_a_linear_probe_changes_the_classifier_alone(trained_run, tmp_path):
    run, _ = trained_run
    source = latest_weights(run)
    config = resolve_config(
        [*DIGITS_FAST, *QUIET, "--finetune", str(run), "--freeze", "--output", str(tmp_path)]
    )
    result = train(config)
    probed = latest_weights(tmp_path)
    changed = [key for key in source if not torch.equal(probed[key], source[key])]
    assert sorted(changed) == ["head.bias", "head.weight"]
    assert result["top1"] > 30  # 10 digit classes: chance is 10%
    note = (tmp_path / "finetune.txt").read_text()
    assert "not loaded: head.weight" in note and "not loaded: head.bias" in note


def test_fine_tuning_trains_every_parameter_from_the_source(trained_run, tmp_path):
    run, _ = trained_run
    source = latest_weights(run)
    train(resolve_config([*DIGITS_FAST, *QUIET, "--finetune", str(run), "--output", str(tmp_path)]))
    tuned = latest_weights(tmp_path)
    assert all(
        not torch.equal(tuned[key], source[key])
        for key in ("patch_embed.proj.weight", "blocks.5.ista.weight")
    )


def test_layer_decay_gives_each_layer_its_own_learning_rate(trained_run):
    run, _ = trained_run
    model = build_model(resolve_config(["--finetune", str(run), "--layer-decay", "0.5"]), num_classes=10)
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=1.0, weight_decay=0.05, layer_decay=0.5)
    scales = sorted({group["lr_scale"] for group in optimizer.param_groups})
    assert (
        len(scales) == 8 and scales[-1] == 1.0 and scales[0] == pytest.approx(0.5**7)
    )  # stem, 6 layers, head


@pytest.mark.parametrize(
    "options, message",
    [
        (["--freeze"], "--freeze trains only the classifier on top of trained weights: add --finetune"),
        (["--layer-decay", "1.5"], "--layer-decay must be in [0, 1)"),
        (["--eval-crop-mode", "zoom"], "--eval-crop-mode must be center, squash or border"),
    ],
)
def test_bad_fine_tuning_options_are_explained(options, message):
    with pytest.raises(ConfigError) as refused:
        resolve_config(options)
    assert message in str(refused.value)


def test_the_transfer_preset_is_the_official_fine_tuning_recipe():
    config = resolve_config(["--preset", "transfer", "--finetune", "crate_alpha_base_patch16_224.in21k"])
    assert (config.model, config.dataset, config.epochs, config.batch_size) == (
        "crate_alpha_base_patch16_224",
        "torch/cifar10",
        200,
        256,
    )
    assert (config.lr, config.lr_batch, config.weight_decay, config.opt, config.warmup_epochs) == (
        5e-5,
        256,
        0.01,
        "adamw",
        0.0,
    )
    data_config = timm.data.resolve_data_config({}, model=timm.create_model("crate_tiny_patch16_224"))
    names = [type(step).__name__ for step in transforms(config, data_config)[0].transforms]
    assert (
        names.index("RandAugment") == names.index("RandomHorizontalFlip") + 1
    )  # torchvision's, after the flip
    assert json.dumps(config.__dict__)  # saved as config.json


@pytest.mark.parametrize("preset", ["deit", "alpha-finetune"])
def test_rand_augment_posterize_at_full_magnitude_is_black_not_an_error(preset):
    """timm's increasing posterize keeps 4 − int(4·m/10) bits: 0 at magnitude 10, which m9-mstd0.5
    samples in about 2% of its posterize operations. Pillow ≥ 11 raises for 0 bits; the presets'
    transform gives the black image that earlier Pillow did, and leaves 1–4 bits to Pillow."""
    config = resolve_config(["--preset", preset])
    data_config = timm.data.resolve_data_config({}, model=timm.create_model("crate_tiny_patch16_224"))
    ops = [op for step in transforms(config, data_config)[0].transforms for op in getattr(step, "ops", ())]
    (posterize,) = [op for op in ops if op.name == "PosterizeIncreasing"]
    posterize.prob, posterize.magnitude, posterize.magnitude_std = 1.0, 10, 0
    image = Image.fromarray(np.random.default_rng(0).integers(1, 256, (32, 32, 3), dtype=np.uint8))
    assert not np.asarray(posterize(image)).any()
    posterize.magnitude = 5  # 2 bits kept: Pillow's own posterize
    assert np.array_equal(np.asarray(posterize(image)), np.asarray(ImageOps.posterize(image, 2)))
