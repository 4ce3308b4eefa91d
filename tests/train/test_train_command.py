"""What `crate train` is to a user before any step: --resume continues a run with its own options,
--help explains every option, a fine-tune gets its own defaults, --max-steps plans a shorter run
(schedule included), --stop-after ends a session, and the opening lines say what the run is."""

import dataclasses
import json
import logging
import math

import pytest
import timm

from crate.train import PRESETS, ConfigError, TrainConfig, resolve_config, train
from crate.train.command import main
from crate.train.config import option_help
from crate.train.setup import make_optimizer
from tests.helpers import FAST, fast_config


def _saved_run(folder, *options: str) -> TrainConfig:
    """A run folder as the trainer leaves it before its first checkpoint: its config.json."""
    config = resolve_config(["--output", str(folder), *options])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    return config


# -- --resume -----------------------------------------------------------------------------------------
def test_resume_continues_the_run_with_its_own_options(tmp_path):
    saved = _saved_run(tmp_path, "--dataset", "digits", "--lr", "0.01", "--epochs", "3")
    resumed = resolve_config(["--output", str(tmp_path), "--resume", "--workers", "1"])
    assert (resumed.dataset, resumed.lr, resumed.epochs) == ("digits", 0.01, 3)
    assert resumed.workers == 1 and resumed.resume
    assert dataclasses.replace(resumed, workers=saved.workers, resume=False) == saved


def test_resume_refuses_a_conflicting_option_by_name(tmp_path):
    _saved_run(tmp_path, "--dataset", "digits", "--lr", "0.01")
    with pytest.raises(
        ConfigError,
        match=r"differ: --dataset fashion-mnist \(the run's: digits\), --lr 0\.5 \(the run's: 0\.01\);",
    ):
        resolve_config(["--output", str(tmp_path), "--resume", "--lr", "0.5", "--dataset", "fashion-mnist"])
    assert resolve_config(["--output", str(tmp_path), "--resume", "--lr", "0.01"]).lr == 0.01


def test_a_session_option_is_not_taken_over_by_the_next_session(tmp_path):
    _saved_run(tmp_path, "--stop-after", "3", "--skip-verify")
    resumed = resolve_config(["--output", str(tmp_path), "--resume"])
    assert resumed.stop_after == 0 and resumed.skip_verify is False


# -- --help -------------------------------------------------------------------------------------------
def test_every_option_has_a_description():
    descriptions = option_help()
    fields = [field.name for field in dataclasses.fields(TrainConfig)]
    assert sorted(descriptions) == sorted(fields)
    assert all(len(descriptions[name].split()) >= 3 for name in fields), descriptions


def test_help_lists_descriptions_defaults_and_presets(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--lr LR peak learning rate at --lr-batch; scaled linearly to --batch-size (MAE's" in text
    assert "lr = blr × batch / 256) (default: 0.002;" in text
    assert f"paper: {PRESETS['paper']['lr']}" in text
    for name in PRESETS:
        assert f" {name} " in text
    assert "crate train --output RUN --resume" in text


# -- defaults of a fine-tune -----------------------------------------------------------------------
def test_a_finetune_gets_its_own_output_and_the_sources_model(tmp_path):
    _saved_run(tmp_path / "source", "--model", "crate_mini_patch4_28")
    config = resolve_config(["--finetune", str(tmp_path / "source"), "--dataset", "digits"])
    assert config.model == "crate_mini_patch4_28"
    assert config.output == "runs/finetune-digits-crate_mini_patch4_28"
    assert resolve_config(["--dataset", "digits"]).output == "runs/digits"
    assert resolve_config([]).output == TrainConfig.output


# -- the plan: --max-steps and --stop-after -------------------------------------------------------
def test_max_steps_shortens_the_schedule_instead_of_cutting_it():
    config = resolve_config(["--max-steps", "40", "--epochs", "10", "--warmup-epochs", "1"])
    model = timm.create_model("crate_mini_patch7_28", num_classes=10)
    optimizer, scheduler = make_optimizer(config, model, steps_per_epoch=100)
    peak = optimizer.param_groups[0]["initial_lr"]  # the scaled --lr the schedule starts from
    learning_rates = []
    for step in (4, 20, 40):  # warm-up is a tenth of the plan, as it is of the full run
        scheduler.step_update(step)
        learning_rates.append(optimizer.param_groups[0]["lr"])

    def cosine(step):  # timm's, from the peak at step 0 of 40 to min_lr at step 40
        return config.min_lr + 0.5 * (peak - config.min_lr) * (1 + math.cos(math.pi * step / 40))

    assert learning_rates == pytest.approx([cosine(4), cosine(20), config.min_lr])


def test_stop_after_ends_the_session_with_a_checkpoint_and_says_how_to_continue(tmp_path, caplog):
    with caplog.at_level(logging.INFO, "crate.train"):
        result = train(fast_config(tmp_path, "--max-steps", "6", "--stop-after", "2", "--log-every", "1"))
    assert result["step"] == 2 and (tmp_path / "checkpoint-00000002").is_dir()
    assert (
        f"stopped after step 2 of 6 (--stop-after): `crate train --output {tmp_path} --resume`" in caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, "crate.train"):
        assert train(resolve_config(["--output", str(tmp_path), "--resume"]))["step"] == 6
    assert "resuming at step 2" in caplog.text


def test_the_opening_lines_say_what_the_run_is(tmp_path, caplog):
    with caplog.at_level(logging.INFO, "crate.train"):
        train(resolve_config([*FAST, "--output", str(tmp_path), "--max-steps", "3", "--log-every", "1"]))
    lines = [record.getMessage() for record in caplog.records if record.name == "crate.train"]
    assert lines[0] == f"output: {tmp_path}"
    assert lines[1].startswith("model: crate_mini_patch7_28, 0.") and "10 classes, from scratch" in lines[1]
    assert lines[2] == "data: fashion-mnist, 1024 training images, 512 evaluation images"
    assert lines[3].startswith("device: cpu, precision ") and "64 images per step" in lines[3]
    assert lines[4].startswith("steps: 3 planned, --max-steps 3 (of 10 epochs x 16 steps)")
    assert any(line.endswith("to step 3") and " s per step: about " in line for line in lines)
