"""Faults one process meets: a poisoned batch, checkpoints that fail to write or read back, a state.pt
carrying a pickle payload, and configurations that cannot run (refused before any work, in one line)."""

import errno
import json
import logging
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from crate.data import InMemoryImages
from crate.train import EXIT_NONFINITE, ConfigError, main, resolve_config, train
from crate.train.faults import STOP_SIGNALS, StopSignals
from crate.weights import checkpoint
from tests.helpers import FAST, latest_weights

# 256 images of batch 64: 4 optimizer steps an epoch, each image once per epoch
TINY = [*FAST, "--train-subset", "256", "--eval-subset", "64", "--checkpoint-every", "100"]


def _poison(monkeypatch, poisoned) -> None:
    """Training images (the augmented split) for which ``poisoned(dataset, index)`` holds become NaN."""
    clean = InMemoryImages.__getitem__

    def getitem(self, index):
        image, label = clean(self, index)
        return (
            (torch.full_like(image, float("nan")), label)
            if self.augment and poisoned(self, index)
            else (
                image,
                label,
            )
        )

    monkeypatch.setattr(InMemoryImages, "__getitem__", getitem)


def _records(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


# -- non-finite steps --------------------------------------------------------------------------------
def test_a_poisoned_batch_skips_one_update_and_is_logged_and_counted(tmp_path, monkeypatch, caplog):
    _poison(monkeypatch, lambda dataset, index: index == 77)
    caplog.set_level(logging.WARNING, "crate.train")
    result = train(resolve_config([*TINY, "--max-steps", "4", "--output", str(tmp_path)]))
    skipped = [r for r in _records(tmp_path) if "nonfinite_loss" in r]
    assert len(skipped) == 1 and skipped[0]["nonfinite_gradient"] is not None, skipped
    assert f"step {skipped[0]['step']}: loss nan, first non-finite gradient: " in caplog.text
    assert _records(tmp_path)[-2]["nonfinite_steps"] == 1  # the last step's log record, then evaluation
    state = torch.load(checkpoint.latest(tmp_path) / "state.pt", weights_only=True)
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {3}  # 4 steps, one skipped
    weights = latest_weights(tmp_path)
    assert all(t.isfinite().all() for t in weights.values()) and result["top1"] > 0


def test_consecutive_nonfinite_steps_stop_the_run_with_the_last_good_weights(tmp_path, monkeypatch, caplog):
    _poison(monkeypatch, lambda dataset, index: dataset.epoch >= 1)  # epoch 0 clean, then every batch
    argv = [*TINY, "--epochs", "3", "--max-nonfinite-steps", "3", "--keep-checkpoints", "3"]
    with pytest.raises(SystemExit) as stopped:
        main([*argv, "--output", str(tmp_path)])
    assert stopped.value.code == EXIT_NONFINITE
    assert "3 optimizer steps in a row had a non-finite loss or gradient (up to step 7)" in caplog.text
    good, stop = tmp_path / "checkpoint-00000004", tmp_path / "checkpoint-00000007"
    assert checkpoint.latest(tmp_path) == stop
    before, after = load_file(good / "model.safetensors"), load_file(stop / "model.safetensors")
    assert all(torch.equal(before[key], after[key]) for key in before)


# -- checkpoint faults -------------------------------------------------------------------------------
def _trained(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def _restored(folder):
    model, optimizer = _trained(99)
    step = checkpoint.restore(folder, model, optimizer)
    return step, model


def test_a_save_failing_half_way_leaves_the_previous_checkpoint_latest(tmp_path, monkeypatch):
    model, optimizer = _trained(0)
    checkpoint.save(tmp_path, 1, model, optimizer)
    newer, newer_optimizer = _trained(1)

    def disk_full(state, path):
        with open(path, "wb") as handle:
            handle.write(b"PK\x03\x04 half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save(tmp_path, 2, newer, newer_optimizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000001", "latest"]
    assert checkpoint.latest(tmp_path) == tmp_path / "checkpoint-00000001"
    monkeypatch.undo()
    step, restored = _restored(tmp_path)
    assert step == 1 and torch.equal(restored.weight, model.weight)


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_save_keeps_the_newest_checkpoints(tmp_path, keep):
    for step in range(1, 6):
        checkpoint.save(tmp_path, step, *_trained(step), keep=keep)
    kept = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert kept == [checkpoint.step_folder(tmp_path, step).name for step in range(6 - keep, 6)]
    assert checkpoint.latest(tmp_path) == checkpoint.step_folder(tmp_path, 5)


@pytest.mark.parametrize("damage", ["truncate", "flip a byte", "delete"])
@pytest.mark.parametrize("file", ["model.safetensors", "state.pt"])
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_resumed(tmp_path, caplog, damage, file):
    model, optimizer = _trained(0)
    checkpoint.save(tmp_path, 1, model, optimizer)
    checkpoint.save(tmp_path, 2, *_trained(1))
    path = tmp_path / "checkpoint-00000002" / file
    content = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(content[: len(content) // 2])
    elif damage == "flip a byte":
        path.write_bytes(content[:100] + bytes([content[100] ^ 1]) + content[101:])
    else:
        path.unlink()
    step, restored = _restored(tmp_path)
    assert step == 1 and torch.equal(restored.weight, model.weight)
    assert f"{path} is " in caplog.text and "falling back to the previous checkpoint" in caplog.text


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_state_file_carrying_a_pickle_payload_is_refused(tmp_path, caplog):
    checkpoint.save(tmp_path, 1, *_trained(0))
    folder = tmp_path / "checkpoint-00000001"
    marker = tmp_path / "payload-ran"
    state = torch.load(folder / "state.pt", weights_only=True)
    torch.save(dict(state, payload=_Payload(marker)), folder / "state.pt")
    digests = json.loads((folder / checkpoint.DIGESTS).read_text())  # the tamperer updates the digest too
    digests["state.pt"] = checkpoint._sha256(folder / "state.pt")
    (folder / checkpoint.DIGESTS).write_text(json.dumps(digests))
    with pytest.raises(checkpoint.CheckpointError, match=r"state.pt refused: it holds pickled objects"):
        _restored(tmp_path)
    assert not marker.exists()


# -- configurations that cannot run ------------------------------------------------------------------
BAD = {
    "--model": ["--model", "crate_nonexistent"],
    "--opt": ["--opt", "adamwx"],
    "--preset": ["--preset", "imagenet-fast"],
    "--lr": ["--lr", "-0.001"],
    "--batch-size": ["--batch-size", "0"],
    "--epochs": ["--epochs", "0"],
    "--accum-steps": ["--batch-size", "64", "--accum-steps", "3"],
    "--label-smoothing": ["--model", "crate_mae_mini_patch4_28", "--label-smoothing", "0.1"],  # no labels
    "--mask-ratio": ["--mask-ratio", "0.5"],  # a classifier masks nothing
}


@pytest.mark.parametrize("field", BAD)
def test_a_bad_option_is_refused_when_the_configuration_is_built(field):
    """resolve_config itself refuses (a ConfigError naming the option, exit 2 from the command): the
    check runs when the TrainConfig is built, so a check that is lost fails here at once, not after a
    training run."""
    with pytest.raises(ConfigError) as refused:
        resolve_config(BAD[field])
    assert refused.value.exit_code == 2 and field in str(refused.value)


@pytest.mark.parametrize("field", BAD)
def test_a_bad_option_fails_before_any_work_in_one_line_naming_it(tmp_path, capsys, field):
    with pytest.raises(SystemExit) as refused:
        main([*BAD[field], "--output", str(tmp_path / "run")])
    error = capsys.readouterr().err
    assert refused.value.code == 2 and error.count("\n") == 1, error
    assert error.startswith("crate train: error: ") and field in error, error
    assert not (tmp_path / "run").exists()


def test_world_size_missing_data_and_another_runs_folder_fail_in_one_line(tmp_path, capsys, monkeypatch):
    def refusal(*argv) -> str:
        with pytest.raises(SystemExit) as refused:
            main([*argv, "--output", str(tmp_path / "run")])
        error = capsys.readouterr().err
        assert refused.value.code == 2 and error.count("\n") == 1, error
        return error

    monkeypatch.setenv("WORLD_SIZE", "3")
    assert "--batch-size 64 (global) must be divisible by world size × --accum-steps (3 × 1)" in refusal(
        "--batch-size", "64"
    )
    monkeypatch.delenv("WORLD_SIZE")
    assert "--data: " in refusal("--data", str(tmp_path / "nowhere"))
    assert "--data: ImageNet not found" in refusal("--dataset", "imagenet", "--data", str(tmp_path))
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()
    saved = json.loads(json.dumps(resolve_config(["--output", str(tmp_path / "run")]).__dict__))
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved | {"lr": 1.0}))
    assert "holds another run (its config.json differs in lr): pass --resume" in refusal()


# -- stop signals ------------------------------------------------------------------------------------
@pytest.mark.parametrize("number", STOP_SIGNALS)
def test_a_stop_signal_is_noted_not_fatal_and_the_handler_put_back(number):
    before = signal.getsignal(number)
    with StopSignals() as signals:
        os.kill(os.getpid(), number)
        assert signals.received == signal.Signals(number).name
    assert signal.getsignal(number) is before
