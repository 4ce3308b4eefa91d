"""`crate train` on real Fashion-MNIST images, both families (parametrized where a check is the same for
both): learning, exact resume (also after a killed process), two gloo processes equal to one,
configuration and data errors; CRATE-α logs its audit and runs under every preset; the published
recipe's presets, --finetune from a local file (offline, the classifier dropped when its class count
differs) and --opt-betas.

These tests need the Fashion-MNIST IDX files (Debian package dataset-fashion-mnist; `make test`
installs it where it can). Without them they fail with the message saying how to get the data.
"""

import dataclasses
import json
import logging
import signal
import time
from pathlib import Path

import pytest
import torch

import reference
from crate import convert_official_state_dict
from crate.runtime import seed_everything
from crate.train import PRESETS, ConfigError, TrainConfig, build_model, resolve_config, train
from crate.train.setup import dataset_classes, make_optimizer, open_datasets, ready_datasets
from crate.weights import checkpoint
from tests.helpers import BOTH_FAMILIES, FAST, fast_config, latest_weights, released_alpha_pth, run_python

ALPHA = ["--model", "crate_alpha_mini_patch4_28"]
ODL_FIELDS = {"nonzero_a1", "nonzero_a2", "lasso_start", "lasso_step1", "lasso_step2", "decoder_drift"}


def _alpha_config(output: Path, *extra: str) -> TrainConfig:
    return fast_config(output, *ALPHA, *extra)


# -- data errors ----------------------------------------------------------------------------------------
def test_missing_imagenet_folder_is_explained(tmp_path):
    with pytest.raises(ConfigError, match=r"--data: .*train is not a folder.*ImageFolder layout"):
        train(
            resolve_config(
                [
                    "--preset",
                    "paper",
                    "--model",
                    "crate_mini_patch4_28",
                    "--data",
                    str(tmp_path),
                    "--output",
                    str(tmp_path / "run"),
                ]
            )
        )


def test_imagenet_class_count_comes_from_the_train_folders(tmp_path):
    from PIL import Image

    for split, labels in (("train", "abc"), ("val", "abc")):
        for label in labels:
            (tmp_path / split / label).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / label / "0.png")
    config = resolve_config(
        ["--dataset", "imagenet", "--data", str(tmp_path), "--output", str(tmp_path / "run")]
    )
    assert dataset_classes(config) == 3
    model = build_model(config)
    assert model.num_classes == 3 and model.head.out_features == 3
    train_set, _ = ready_datasets(config, model, *open_datasets(config))
    assert len(train_set) == 3
    (tmp_path / "val" / "c" / "0.png").unlink()
    (tmp_path / "val" / "c").rmdir()
    with pytest.raises(ValueError, match=r"must hold the same class folders.*only in train/: \['c'\]"):
        open_datasets(config)


# -- configuration ----------------------------------------------------------------------------------
def test_presets_and_overrides():
    paper = resolve_config(["--preset", "paper", "--lr", "1e-3", "--no-amp"])
    assert (paper.opt, paper.batch_size, paper.weight_decay, paper.epochs) == ("lion", 2048, 0.5, 150)
    assert paper.lr == 1e-3 and paper.amp is False
    deit = resolve_config(["--preset", "deit"])
    assert deit.mixup == 0.8 and deit.auto_augment.startswith("rand") and deit.ema_decay > 0
    with pytest.raises(ConfigError, match="--preset 'nope' is unknown"):
        resolve_config(["--preset", "nope"])


def test_alpha_presets_are_the_published_recipe():
    finetune = resolve_config(["--preset", "alpha-finetune"])
    assert finetune.model == "crate_alpha_base_patch16_224"
    assert finetune.finetune == "crate_alpha_base_patch16_224.in21k"
    assert finetune.dataset == "imagenet" and finetune.epochs == 91 and finetune.warmup_epochs == 10
    assert (finetune.opt, finetune.opt_betas, finetune.weight_decay, finetune.grad_clip) == (
        "adamw",
        "0.9,0.95",
        0.1,
        1.0,
    )
    assert finetune.batch_size == 4096 and finetune.lr * finetune.batch_size / finetune.lr_batch == 1.6e-4
    assert (finetune.lr, finetune.lr_batch, finetune.min_lr) == (1e-5, 256, 1e-6)
    assert finetune.auto_augment.startswith("rand-m9-n2") and finetune.label_smoothing == 0.1
    assert (finetune.mixup, finetune.cutmix, finetune.drop_path, finetune.reprob) == (0.8, 1.0, 0.0, 0.0)
    assert finetune.ema_decay == 0.0
    pretrain = resolve_config(["--preset", "alpha-pretrain"])
    assert pretrain.model == "crate_alpha_base_patch16_224" and not pretrain.finetune
    assert (pretrain.lr, pretrain.lr_batch, pretrain.batch_size, pretrain.epochs) == (5e-5, 256, 4096, 91)
    assert pretrain.auto_augment is None and pretrain.label_smoothing == 0.0
    assert (pretrain.opt_betas, pretrain.weight_decay, pretrain.grad_clip) == ("0.9,0.95", 0.1, 1.0)
    assert (pretrain.mixup, pretrain.cutmix, pretrain.min_lr, pretrain.warmup_epochs) == (0.8, 1.0, 1e-6, 10)


def test_the_defaults_and_every_preset_are_valid_configurations():
    assert TrainConfig().preset == "fashion-mnist"
    for preset in PRESETS:
        assert resolve_config(["--preset", preset]).preset == preset


def test_opt_betas_reach_the_optimizer(tmp_path):
    train(_alpha_config(tmp_path, "--max-steps", "1", "--eval-subset", "64", "--opt-betas", "0.9,0.95"))
    state = torch.load(checkpoint.latest(tmp_path) / "state.pt", weights_only=True)
    assert list(state["optimizer"]["param_groups"][0]["betas"]) == [0.9, 0.95]  # AdamW's default: 0.999
    assert resolve_config([]).betas is None and resolve_config(["--opt-betas", ""]).betas is None


def test_bad_options_are_explained(tmp_path):
    for value in ("0.9", "0.9,x", "0.9,1.5"):
        with pytest.raises(ConfigError) as refused:
            resolve_config(["--opt-betas", value])
        error = str(refused.value)
        assert "--opt-betas must be two comma-separated numbers in [0, 1)" in error and repr(value) in error
    with pytest.raises(ValueError, match=r"optimizer 'sgd' \(SGD\) takes no betas"):
        train(_alpha_config(tmp_path, "--opt", "sgd", "--opt-betas", "0.9,0.95", "--max-steps", "1"))
    with pytest.raises(
        ValueError, match=r"crate_alpha_mini_patch4_28: timm knows the model but has no published"
    ):
        build_model(resolve_config([*ALPHA, "--finetune", "crate_alpha_mini_patch4_28"]))
    missing = str(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match=r"missing.pth: neither a file or folder"):
        build_model(resolve_config([*ALPHA, "--finetune", missing]))


def test_learning_rate_is_scaled_linearly_to_the_global_batch():
    config = resolve_config(["--batch-size", "256", "--lr-batch", "64", "--lr", "1e-3"])
    optimizer, scheduler = make_optimizer(config, torch.nn.Linear(3, 2), steps_per_epoch=10)
    assert scheduler.base_values == [pytest.approx(4e-3, rel=1e-12)] * len(optimizer.param_groups)


# -- learning ---------------------------------------------------------------------------------------
def test_accumulated_micro_batches_take_the_step_of_the_whole_batch(tmp_path):
    """--accum-steps 2 over micro-batches of 32 is one batch of 64: the same logged loss and, with plain
    SGD (an update proportional to the gradient, unlike Adam's), the same parameters."""
    common = [
        *["--max-steps", "1", "--log-every", "1", "--no-amp", "--opt", "sgd", "--warmup-epochs", "0"],
        *["--eval-subset", "64", "--telemetry-batch", "0"],
    ]
    train(fast_config(tmp_path / "whole", *common))
    train(fast_config(tmp_path / "accumulated", *common, "--accum-steps", "2"))

    def losses(folder: Path) -> list[float]:
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        return [record["loss"] for record in map(json.loads, lines) if "loss" in record]

    assert losses(tmp_path / "accumulated") == pytest.approx(losses(tmp_path / "whole"), rel=1e-5)
    seed_everything(0)  # the runs' initial parameters (seed 0)
    initial = build_model(fast_config(tmp_path / "initial")).state_dict()
    whole, accumulated = latest_weights(tmp_path / "whole"), latest_weights(tmp_path / "accumulated")
    for key in whole:
        change = (whole[key] - initial[key]).abs().max().item()
        difference = (whole[key] - accumulated[key]).abs().max().item()
        # float32 sums in another order: measured <= 6e-8 (half an ulp of 1) against changes of 1e-4 to
        # 1e-3; a gradient off by a factor moves the step by a fraction of the change itself
        assert difference <= 1e-2 * change + 2.4e-7, (key, difference, change)


def test_training_learns_fashion_mnist_far_above_chance(trained_run):
    tmp_path, result = trained_run
    # chance is 10%; the worst of 6 seeds measured 68.7% (float32) and 69.9% (bf16) (conftest.py)
    assert result["top1"] > 60, result
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["train_subset"] == 4096 and saved["model"] == "crate_mini_patch4_28"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "verification" and records[0]["passed"], records[0]  # the gate, first
    assert {"loss", "lr", "images_per_s"} <= records[1].keys()
    evaluation = [r for r in records if "top1" in r]
    assert len(evaluation) == 5 and {"top5", "eval_loss", "whitebox"} <= evaluation[-1].keys()
    assert len(evaluation[-1]["whitebox"]) == 6 and "compression_in" in evaluation[-1]["whitebox"][0]


@pytest.fixture(scope="module")
def alpha_run(tmp_path_factory):
    """(run folder, final evaluation): crate_alpha_mini_patch4_28, 2048 training images, 3 epochs at
    batch 32 (192 steps; 14 s on 2 quiet cores)."""
    output = tmp_path_factory.mktemp("alpha-run")
    config = resolve_config(
        [
            *ALPHA,
            "--train-subset",
            "2048",
            "--eval-subset",
            "500",
            "--epochs",
            "3",
            "--batch-size",
            "32",
            "--lr-batch",
            "32",
            "--warmup-epochs",
            "0.5",
            "--telemetry-batch",
            "8",
            "--log-every",
            "8",
            "--output",
            str(output),
        ]
    )
    return output, train(config)


def test_crate_alpha_learns_fashion_mnist_and_logs_its_audit(alpha_run):
    output, result = alpha_run
    assert result["top1"] > 50, result  # chance is 10%; measured 66.2%
    assert json.loads((output / "config.json").read_text())["model"] == "crate_alpha_mini_patch4_28"
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "top1" in r]
    assert len(evaluations) == 3 and evaluations[0]["top1"] < evaluations[-1]["top1"]
    for record in evaluations:
        assert record["whitebox_images"] == 8 and len(record["whitebox"]) == 6
        for row in record["whitebox"]:
            assert ODL_FIELDS | {"compression_in", "eta_lipschitz", "orthonormality_gap"} <= row.keys()
            assert "nonzero" not in row and "lasso_end" not in row  # CRATE's ISTA fields
            assert row["lasso_step2"]["mean"] <= row["lasso_start"]["mean"]


@pytest.mark.parametrize("preset", sorted(set(PRESETS) - {"fashion-mnist"}))  # that one: alpha_run
def test_every_preset_trains_crate_alpha(preset, tmp_path):
    """Each preset's recipe (Lion, EMA, Mixup/CutMix, drop path, gradient clipping, betas) with the
    CRATE-α demo model on Fashion-MNIST: one optimizer step, an evaluation and the telemetry."""
    config = resolve_config(
        [
            "--preset",
            preset,
            *ALPHA,
            "--dataset",
            "fashion-mnist",
            "--finetune",
            "",
            "--workers",
            "0",
            *FAST,
            "--eval-subset",
            "64",
            "--max-steps",
            "1",
            "--output",
            str(tmp_path),
        ]
    )
    result = train(config)
    assert result["step"] == 1 and ODL_FIELDS <= result["whitebox"][0].keys()
    assert all(torch.isfinite(value).all() for value in latest_weights(tmp_path).values())


# -- checkpoints and exact resume -------------------------------------------------------------------
@BOTH_FAMILIES
def test_resumed_run_ends_with_the_same_parameters(family, tmp_path):
    # CRATE-α's runs evaluate 64 images, to keep its slower steps to seconds
    options = ["--model", family.mini, "--checkpoint-every", "3"]
    options += ["--eval-subset", "64"] if family.name == "crate_alpha" else []
    train(fast_config(tmp_path / "straight", "--max-steps", "6", *options))
    train(fast_config(tmp_path / "resumed", "--max-steps", "6", "--stop-after", "3", *options))
    assert checkpoint.latest(tmp_path / "resumed").name == "checkpoint-00000003"
    train(fast_config(tmp_path / "resumed", "--max-steps", "6", *options, "--resume"))
    straight, resumed = (
        latest_weights(tmp_path / "straight"),
        latest_weights(tmp_path / "resumed"),
    )
    assert straight.keys() == resumed.keys() and any(f".{family.dictionary}" in key for key in straight)
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_killed_run_resumes_to_the_same_parameters(tmp_path):
    args = ["-m", "crate.train", *FAST, "--max-steps", "12", "--checkpoint-every", "2"]
    reference_run = run_python(*args, "--output", str(tmp_path / "straight"))
    victim = run_python(*args, "--output", str(tmp_path / "killed"))
    latest = tmp_path / "killed" / "latest"
    deadline = time.monotonic() + 300
    while not (latest.exists() and int(latest.read_text().split("-")[1]) >= 4):
        assert victim.poll() is None, victim.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint at step 4 within 300 s"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = int(latest.read_text().split("-")[1])
    assert killed_at < 12
    resumed = run_python(*args, "--output", str(tmp_path / "killed"), "--resume")
    assert resumed.wait() == 0, resumed.stdout.read()
    assert reference_run.wait() == 0, reference_run.stdout.read()
    straight, after_kill = latest_weights(tmp_path / "straight"), latest_weights(tmp_path / "killed")
    for key in straight:
        assert torch.equal(straight[key], after_kill[key]), key


def test_resume_without_a_run_is_explained(tmp_path):
    with pytest.raises(ConfigError, match=f"--resume: {tmp_path} holds no run to continue"):
        fast_config(tmp_path, "--max-steps", "1", "--resume")


def test_resume_before_the_first_checkpoint_starts_at_step_0(tmp_path, caplog):
    fresh = fast_config(tmp_path, "--max-steps", "1")
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(fresh)))
    with caplog.at_level(logging.INFO, "crate.train"):
        result = train(fast_config(tmp_path, "--resume"))
    assert result["step"] == 1 and "from scratch" in caplog.text


# -- distributed -----------------------------------------------------------------------------------
def test_two_gloo_processes_reach_the_parameters_of_one(tmp_path):
    """torchrun with 2 CPU processes and the same global batch and seed as a single process."""
    args = [
        *FAST,
        "--max-steps",
        "5",
        "--checkpoint-every",
        "5",
        "--no-amp",  # float32: a bf16 split rounds apart
        "--opt",
        "sgd",  # parameters move with the averaged gradients, not with Adam's sign of tiny ones
    ]
    single = run_python("-m", "crate.train", *args, "--output", str(tmp_path / "one"))
    assert single.wait() == 0, single.stdout.read()
    pair = run_python(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "crate.train",
        *args,
        "--output",
        str(tmp_path / "two"),
    )
    assert pair.wait() == 0, pair.stdout.read()
    one, two = latest_weights(tmp_path / "one"), latest_weights(tmp_path / "two")
    worst = max((one[key] - two[key]).abs().max().item() for key in one)
    print(f"max parameter difference between 1 and 2 processes after 5 steps: {worst:.2e}")
    # float32 SGD: the all-reduce sums in another order, which moves a parameter by lr times a few ulps
    # of its gradient per step; 1e-6 is 8 ulps of an O(1) parameter (measured 1.5e-8). Adam's first
    # steps at the full lr, lr·sign(g), would turn a tiny gradient's rounding into a step of its own
    assert worst < 1e-6


@pytest.mark.slow
def test_two_gloo_processes_compiled_reach_the_parameters_of_two_eager(tmp_path):
    """DDP over the compiled step (torch.compile's DDPOptimizer splits the graph at the gradient
    buckets, so that each bucket's all-reduce overlaps the rest of the backward) reaches eager DDP's
    parameters after 5 float32 SGD steps, to the bound of the one-process compiled step
    (test_train_compile.py: 1% of each parameter's change plus 4 ulps of 1, a margin over the fused
    kernels' rounding; measured 2026-12-07, Intel Xeon, 2 cores, avx512_bf16: at most 3.0e-7, on
    patch_embed.proj.weight, against changes of 1e-4 to 7e-3). ~75 s with a cold compile cache, ~30 s warm."""
    args = [*FAST, "--max-steps", "5", "--checkpoint-every", "5", "--no-amp", "--opt", "sgd"]
    for name, option in (("eager", "--no-compile"), ("compiled", "--compile")):
        pair = run_python(
            *("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
            *("-m", "crate.train", *args, option, "--output", str(tmp_path / name)),
        )
        assert pair.wait() == 0, pair.stdout.read()
    seed_everything(0)  # the run's initial model, as set_up builds it
    initial = build_model(resolve_config([*args])).state_dict()
    eager, compiled = latest_weights(tmp_path / "eager"), latest_weights(tmp_path / "compiled")
    for key in eager:
        change = (eager[key] - initial[key]).abs().max().item()
        difference = (eager[key] - compiled[key]).abs().max().item()
        assert change > 0, key
        assert difference <= 1e-2 * change + 2.4e-7, (key, difference, change)


# -- fine-tuning CRATE-α from released files ---------------------------------------------------------
def test_finetune_from_a_released_file_loads_offline_with_a_new_classifier(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    drawn = released_alpha_pth(tmp_path / "released.pth", num_classes=7, seed=2)  # the release's key names
    released = convert_official_state_dict({key: value.float() for key, value in drawn.items()})
    model = build_model(resolve_config([*ALPHA, "--finetune", str(tmp_path / "released.pth")]))
    state = model.state_dict()
    assert model.num_classes == 10 and state["head.weight"].shape == (10, 128)  # the dataset's classes
    for key, value in released.items():
        if not key.startswith("head."):
            assert torch.equal(state[key], value), key

    # the file does not fit CRATE-α-B/16: every key is named
    with pytest.raises(
        ValueError, match=r"does not fit CRATEAlpha(.|\n)*'blocks\.0\.odl\.D' has shape \(128, 512\)"
    ):
        build_model(
            resolve_config(
                ["--model", "crate_alpha_base_patch16_224", "--finetune", str(tmp_path / "released.pth")]
            )
        )

    # and the run trains from it
    released_file = str(tmp_path / "released.pth")
    result = train(_alpha_config(tmp_path / "run", "--finetune", released_file, "--max-steps", "2"))
    assert result["step"] == 2
    assert json.loads((tmp_path / "run" / "config.json").read_text())["finetune"].endswith("released.pth")
    assert "not loaded: head.weight" in (tmp_path / "run" / "finetune.txt").read_text()


def _fake_imagenet(root: Path, classes: int = 3, per_class: int = 4) -> Path:
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for label in range(classes):
            folder = root / split / f"n{label:08d}"
            folder.mkdir(parents=True)
            for index in range(per_class):
                pixels = torch.randint(0, 256, (64, 80, 3), dtype=torch.uint8, generator=generator)
                Image.fromarray(pixels.numpy()).save(folder / f"{index}.png")
    return root


def test_alpha_finetune_recipe_runs_on_an_image_folder_from_a_released_checkpoint(tmp_path, monkeypatch):
    """The alpha-finetune preset end to end on CPU (RandAugment, Mixup/CutMix, Inception crop,
    betas, gradient clipping, the released layout's checkpoint, a 3-class folder) with CRATE-α-Ti/16
    standing in for B/16, whose size is the GPU's."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = _fake_imagenet(tmp_path / "imagenet")
    state = reference.random_official_alpha_state_dict(
        dim=192, depth=12, heads=3, head_dim=64, patch_size=16, channels=3, num_patches=196, num_classes=11
    )
    torch.save({key: value.float() for key, value in state.items()}, tmp_path / "tiny.pth")
    options = ["--preset", "alpha-finetune", "--model", "crate_alpha_tiny_patch16_224", "--data", str(data)]
    options += ["--finetune", str(tmp_path / "tiny.pth"), "--batch-size", "4", "--workers", "0"]
    options += ["--max-steps", "2", "--telemetry-batch", "2", "--output", str(tmp_path / "run")]
    result = train(resolve_config(options))
    assert result["step"] == 2 and result["eval_images"] == 12 and len(result["whitebox"]) == 12
    weights = latest_weights(tmp_path / "run")
    assert weights["head.weight"].shape == (3, 192)  # the folder's 3 classes, the file's 11 dropped
    released = convert_official_state_dict(state)  # two warm-up steps at lr ~1e-10 barely move it
    for key in ("blocks.7.odl.D1", "patch_embed.proj.weight", "pos_embed"):
        torch.testing.assert_close(weights[key], released[key].float(), rtol=0, atol=1e-6)
