"""`crate train` of a masked autoencoder (crate_mae_*, --preset mae) on real Fashion-MNIST images: the
objective is the model's own masked-patch reconstruction (no labels), evaluated at a fixed seeded
masking; the preset is MAE's recipe; the options an autoencoder cannot use are refused; a run resumes
bit for bit; its encoder fine-tunes as a classifier (crate_mae_encoder_*), from a run or a released file.

The gate does not apply to the encoder as a classifier (crate/verify/families.py: no released classifier
has its Conv2d patch embedding); its layers are the autoencoder's, which the gate checks.
"""

import json
import signal
from pathlib import Path

import pytest
import torch

import reference
from crate.evaluate import evaluate_source, measure_reconstruction
from crate.models.mae import CRATEMAE, convert_released_mae_state_dict, encoder_state_dict
from crate.runtime import autocast, seed_everything
from crate.train import ConfigError, PreemptedError, build_model, loop, resolve_config, train
from crate.train.command import parser
from crate.train.objective import Reconstruction
from crate.train.setup import open_datasets, ready_datasets
from crate.weights import checkpoint, sources
from tests.helpers import latest_weights, run_python

MAE = ["--preset", "mae", "--model", "crate_mae_mini_patch4_28", "--dataset", "fashion-mnist"]
ENCODER = ["--model", "crate_mae_encoder_mini_patch4_28"]
# 1024 images at batch 64 (16 steps an epoch), the preset's lr rule at this batch, 256 images evaluated
FAST_MAE = [
    *MAE,
    *["--workers", "0", "--train-subset", "1024", "--eval-subset", "256", "--batch-size", "64"],
    *["--lr", "1e-3", "--lr-batch", "64", "--log-every", "2", "--eval-every", "1"],
]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
    """(run folder, final evaluation): crate_mae_mini_patch4_28, 24 steps (1.5 epochs) at batch 64."""
    output = tmp_path_factory.mktemp("mae-run")
    return output, train(resolve_config([*FAST_MAE, "--max-steps", "24", "--output", str(output)]))


# -- the recipe and its options -----------------------------------------------------------------------
def test_the_mae_preset_is_the_mae_repositorys_recipe():
    config = resolve_config(["--preset", "mae"])
    assert (config.model, config.dataset, config.epochs, config.warmup_epochs) == (
        "crate_mae_base_patch16_224",
        "imagenet",
        800,
        40,
    )
    assert (config.opt, config.opt_betas, config.weight_decay, config.min_lr) == (
        "adamw",
        "0.9,0.95",
        0.05,
        0,
    )
    assert config.lr * config.batch_size / config.lr_batch == pytest.approx(1.5e-4 * 4096 / 256, rel=1e-12)
    assert (config.mask_ratio, config.scale, config.hflip) == (0.75, (0.2, 1.0), 0.5)
    assert (config.label_smoothing, config.mixup, config.cutmix, config.auto_augment) == (0, 0, 0, None)
    assert 'MAE\'s "base lr" rule' in parser().format_help()
    mini = resolve_config(MAE)
    assert mini.model == "crate_mae_mini_patch4_28" and mini.output == "runs/mae-fashion-mnist"
    # without the preset, an autoencoder's run still records no label smoothing and gets its own folder
    plain = resolve_config(["--model", "crate_mae_mini_patch4_28"])
    assert plain.label_smoothing == 0 and plain.output == "runs/mae-fashion-mnist"
    # and a classifier under the preset takes its optimizer recipe and masks nothing
    assert resolve_config(["--preset", "mae", "--model", "crate_mini_patch4_28"]).mask_ratio == 0


@pytest.mark.parametrize(
    "options, named",
    [
        (["--label-smoothing", "0.1"], "--label-smoothing 0.1"),
        (["--mixup", "0.8", "--cutmix", "1.0"], "--mixup 0.8, --cutmix 1.0"),
        (["--layer-decay", "0.75"], "--layer-decay 0.75"),
        (
            ["--preset", "deit", "--cutmix", "0.5"],
            "--mixup 0.8 (--preset deit), --cutmix 0.5, --label-smoothing 0.1 (--preset deit)",
        ),
    ],
)
def test_options_an_autoencoder_cannot_use_are_refused_by_name(options, named):
    with pytest.raises(ConfigError) as refused:
        resolve_config([*MAE, *options])
    message = str(refused.value)
    assert "\n" not in message and "crate_mae_mini_patch4_28 is a masked autoencoder" in message
    assert f"cannot use {named};" in message


def test_mask_ratio_reaches_the_model_and_is_refused_where_it_means_nothing(tmp_path):
    model = build_model(resolve_config([*MAE, "--mask-ratio", "0.5"]))
    assert isinstance(model, CRATEMAE) and model.config.mask_ratio == 0.5
    assert build_model(resolve_config(MAE)).config.mask_ratio == 0.75
    with pytest.raises(ConfigError, match=r"--mask-ratio is for masked autoencoders .*crate_mini_patch4_28"):
        resolve_config(["--model", "crate_mini_patch4_28", "--mask-ratio", "0.5"])
    with pytest.raises(ConfigError, match=r"--mask-ratio must be in \(0, 1\)"):
        resolve_config([*MAE, "--mask-ratio", "1"])
    with pytest.raises(ConfigError, match=r"--crop-scale must be two comma-separated numbers"):
        resolve_config([*MAE, "--crop-scale", "0.5,0.2"])


# -- the objective: reconstruction ----------------------------------------------------------------------
def test_training_lowers_the_reconstruction_error_to_the_mean_predictors(mae_run):
    """The untrained model's masked-patch MSE is far above that of predicting 0 (the dataset's mean in
    normalised pixels), whose MSE is the mean square of the evaluated pixels, ≈ 1; 24 steps bring the
    model to it. Measured: 3.68 at init, 1.04 after 24 steps, against 1.03 for 0. Going below it
    takes hundreds of steps (a plateau; test_a_few_images_are_reconstructed_below_the_mean_predictor)."""
    run, result = mae_run
    config = resolve_config([*FAST_MAE, "--output", str(run)])
    seed_everything(config.seed)  # an initial model of the run's seed
    initial = build_model(config, load_weights=False)
    _, test_set = ready_datasets(config, initial, *open_datasets(config))
    images = torch.stack([test_set[index][0] for index in range(len(test_set))])
    mean_predictor = images.square().mean().item()
    loader = torch.utils.data.DataLoader(test_set, 256)
    at_init = measure_reconstruction(
        initial, loader, torch.device("cpu"), autocast(torch.device("cpu"), False)
    )
    print(
        f"masked-patch MSE: init {at_init['eval_loss']:.3f}, after 24 steps {result['eval_loss']:.3f}, "
        f"predicting 0: {mean_predictor:.3f}"
    )
    assert at_init["eval_loss"] > 1.5 * mean_predictor
    # 10%: the masked patches are 75% of the pixels, drawn at random; their mean square differs from
    # all pixels' by ~1% over 256 images
    assert result["eval_loss"] < 1.1 * mean_predictor


@pytest.mark.slow
def test_a_few_images_are_reconstructed_below_the_mean_predictor(tmp_path):
    """64 training images, evaluated on themselves (no flips): MAE's plateau at the mean predictor's
    error breaks after ~150 steps at lr 1e-3 (measured on a fixed batch); 300 steps leave margin."""
    options = [*MAE, "--workers", "0", "--train-subset", "64", "--val-split", "train", "--eval-subset", "64"]
    options += ["--batch-size", "64", "--lr", "1e-3", "--lr-batch", "64", "--hflip", "0"]
    options += ["--max-steps", "300", "--warmup-epochs", "0", "--eval-every", "1000", "--log-every", "50"]
    result = train(resolve_config([*options, "--output", str(tmp_path)]))
    config = resolve_config([*options, "--output", str(tmp_path / "x")])
    model = build_model(config, load_weights=False)
    _, test_set = ready_datasets(config, model, *open_datasets(config))
    mean_predictor = torch.stack([test_set[i][0] for i in range(64)]).square().mean().item()
    print(f"after 300 steps: {result['eval_loss']:.3f}, predicting 0: {mean_predictor:.3f}")
    assert result["eval_loss"] < 0.8 * mean_predictor


def test_the_evaluation_records_the_reconstruction_error_at_a_fixed_masking(mae_run):
    run, result = mae_run
    records = _records(run)
    assert records[0]["event"] == "verification" and records[0]["passed"]  # the gate checks a CRATE-MAE run
    evaluations = [record for record in records if "eval_loss" in record]
    assert [record["step"] for record in evaluations] == [16, 24]  # the epoch end and the last step
    for record in evaluations:
        assert record.keys() >= {"eval_loss", "eval_mask_ratio", "eval_images", "eval_images_per_s"}
        assert "top1" not in record and record["eval_mask_ratio"] == 0.75 and record["eval_images"] == 256
    assert all("loss" in record for record in records if "lr" in record)
    # the final weights evaluate to the run's number again, twice, drawing nothing from torch's RNG
    config = resolve_config([*FAST_MAE, "--output", str(run)])
    model = sources.load_run(run)
    _, test_set = ready_datasets(config, model, *open_datasets(config))
    # a DataLoader without a generator of its own draws its workers' base seed from torch's
    loader = torch.utils.data.DataLoader(test_set, 256, generator=torch.Generator())
    device = torch.device("cpu")
    before = torch.get_rng_state()
    again = [Reconstruction(config.seed).measure(model, loader, device, autocast(device, True)) for _ in "ab"]
    assert torch.equal(before, torch.get_rng_state())
    assert again[0]["eval_loss"] == again[1]["eval_loss"] == result["eval_loss"]


def test_a_stopped_or_preempted_run_resumes_to_the_same_parameters(tmp_path, monkeypatch):
    """--stop-after 3, and SIGTERM during step 2 (the run stops after step 3 with a checkpoint, exit 75
    from the command), each then --resume: the weights and the final evaluation of an uninterrupted
    run, bit for bit (the masking's noise comes from torch's RNG, which the checkpoint restores)."""
    options = [*FAST_MAE, "--max-steps", "6", "--checkpoint-every", "3"]
    straight = train(resolve_config([*options, "--output", str(tmp_path / "straight")]))
    train(resolve_config([*options, "--stop-after", "3", "--output", str(tmp_path / "stopped")]))
    assert checkpoint.latest(tmp_path / "stopped").name == "checkpoint-00000003"

    step = loop.optimizer_step

    def signalled_in_step_2(run, micro_batches, stop_requested):
        if run.step == 1:
            signal.raise_signal(signal.SIGTERM)
        return step(run, micro_batches, stop_requested)

    monkeypatch.setattr(loop, "optimizer_step", signalled_in_step_2)
    with pytest.raises(PreemptedError, match="stopped at step 3 on a stop signal"):
        train(resolve_config([*options, "--output", str(tmp_path / "preempted")]))
    monkeypatch.setattr(loop, "optimizer_step", step)
    expected = latest_weights(tmp_path / "straight")
    assert any(key.startswith("decoder_blocks.") for key in expected)
    for folder in ("stopped", "preempted"):
        resumed = train(resolve_config([*options, "--output", str(tmp_path / folder), "--resume"]))
        actual = latest_weights(tmp_path / folder)
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(expected[key], actual[key]), (folder, key)
        assert straight["eval_loss"] == resumed["eval_loss"]


@pytest.mark.slow
def test_two_gloo_processes_train_an_autoencoder(tmp_path):
    """torchrun with 2 CPU processes: DistributedDataParallel over the model's (loss, pred, mask)."""
    args = [*FAST_MAE, "--max-steps", "4", "--output", str(tmp_path)]
    pair = run_python(
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "crate.train", *args
    )
    assert pair.wait() == 0, pair.stdout.read()
    assert checkpoint.latest(tmp_path).name == "checkpoint-00000004"
    assert all(torch.isfinite(value).all() for value in latest_weights(tmp_path).values())
    assert [record["eval_images"] for record in _records(tmp_path) if "eval_loss" in record] == [256]


# -- fine-tuning the encoder --------------------------------------------------------------------------------
def test_the_encoder_fine_tunes_from_an_autoencoder_run(mae_run, tmp_path):
    run, _ = mae_run
    model = build_model(resolve_config([*ENCODER, "--finetune", str(run)]))
    expected = encoder_state_dict(latest_weights(run))
    state = model.state_dict()
    assert set(state) - set(expected) == {"head.weight", "head.bias"}  # the classifier alone is new
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    assert "fc_norm.weight" in expected and not any(key.startswith("decoder") for key in expected)
    assert "a CRATE-MAE autoencoder: its encoder loaded" in str(model.finetune_report)

    options = [*ENCODER, "--finetune", str(run), "--workers", "0", "--train-subset", "256"]
    options += ["--eval-subset", "64", "--batch-size", "64", "--max-steps", "2"]
    result = train(resolve_config([*options, "--output", str(tmp_path)]))
    assert result["step"] == 2 and {"top1", "eval_loss"} <= result.keys()
    assert "its encoder loaded" in (tmp_path / "finetune.txt").read_text()
    trained = latest_weights(tmp_path)
    assert trained["head.weight"].shape == (10, 128)
    assert not torch.equal(trained["blocks.0.ista.weight"], expected["blocks.0.ista.weight"])  # it trains


def test_the_encoder_fine_tunes_from_a_released_autoencoder_file(tmp_path):
    released = reference.random_official_mae_state_dict(
        dim=128, depth=4, heads=4, head_dim=32, patch_size=4, channels=1, num_patches=49
    )
    released = {key: value.float() for key, value in released.items()}
    torch.save({"model": released}, tmp_path / "crate_mae_mini.pth")  # an MAE training checkpoint
    model = build_model(resolve_config([*ENCODER, "--finetune", str(tmp_path / "crate_mae_mini.pth")]))
    expected = encoder_state_dict(convert_released_mae_state_dict(released))
    state = model.state_dict()
    assert set(state) - set(expected) == {"head.weight", "head.bias"}
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    assert "a released CRATE-MAE autoencoder (its key names converted)" in str(model.finetune_report)


def test_crate_eval_reports_an_autoencoders_reconstruction_error(mae_run):
    run, _ = mae_run
    result = evaluate_source(str(run), max_images=64, workers=0, progress=False)
    assert result["model"] == "crate_mae_mini_patch4_28" and result["dataset"] == "fashion-mnist"
    assert result["eval_images"] == 64 and result["eval_mask_ratio"] == 0.75 and "top1" not in result
    assert 0 < result["eval_loss"] < 10
