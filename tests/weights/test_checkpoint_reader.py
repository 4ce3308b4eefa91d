"""One checkpoint reader for `crate train --finetune`, `crate eval`, `crate audit` and crate.load_run
(crate/weights/checkpoint.py read_weights): digests checked, a run folder falls back to its newest
intact checkpoint with a warning, an explicit damaged checkpoint folder is refused naming the file and
the intact one beside it; unreadable weights files are named without the libraries' own advice."""

import json
import logging

import pytest
import timm
import torch
from safetensors.torch import load_file

import crate
from crate import audit, evaluate
from crate.errors import MissingError
from crate.weights import checkpoint, sources
from crate.weights.checkpoint import CheckpointError

NAME = "crate_mini_patch4_28"


@pytest.fixture
def run(tmp_path):
    """A run folder as crate train writes it: config.json and checkpoints at steps 1 and 2 (every
    weight of step 2 is step 1's + 1)."""
    model = timm.create_model(NAME, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    (tmp_path / "config.json").write_text(json.dumps(dict(model=NAME, num_classes=0, in_chans=0)))
    checkpoint.save(tmp_path, 1, model, optimizer)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1)
    checkpoint.save(tmp_path, 2, model, optimizer)
    return tmp_path


def weights(run, step: int) -> dict:
    return load_file(checkpoint.step_folder(run, step) / "model.safetensors")


def damage(path, how: str) -> None:
    content = path.read_bytes()
    if how == "truncate":
        path.write_bytes(content[: len(content) // 2])
    else:  # one bit of a tensor flipped: the file still loads
        middle = len(content) // 2
        path.write_bytes(content[:middle] + bytes([content[middle] ^ 1]) + content[middle + 1 :])


def same(state: dict, expected: dict) -> bool:
    return state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)


DAMAGES = ["flip a bit", "truncate"]
WHY = {"flip a bit": "is corrupt: its sha256 does not match", "truncate": "is truncated: "}


@pytest.mark.parametrize("how", DAMAGES)
def test_a_run_folder_reads_the_newest_intact_checkpoint_and_warns(run, how, caplog):
    newest = checkpoint.step_folder(run, 2) / "model.safetensors"
    damage(newest, how)
    with caplog.at_level(logging.WARNING, "crate.checkpoint"):
        source = sources.read_source(run)
    assert same(source.state, weights(run, 1))
    assert source.description == str(checkpoint.step_folder(run, 1) / "model.safetensors")
    assert f"skipping checkpoint-00000002: {newest} {WHY[how]}" in caplog.text
    assert f"reading {checkpoint.step_folder(run, 1)} instead" in caplog.text


@pytest.mark.parametrize("how", DAMAGES)
def test_eval_audit_and_load_run_read_the_previous_checkpoint(run, how, caplog):
    damage(checkpoint.step_folder(run, 2) / "model.safetensors", how)
    expected = weights(run, 1)
    with caplog.at_level(logging.WARNING, "crate.checkpoint"):
        model, name = audit.load_model(run)
        loaded = crate.load_run(run)
        result = evaluate.evaluate_source(
            str(run), "digits", workers=0, max_images=16, batch_size=16, progress=False, device="cpu"
        )
    assert name == NAME and same(model.state_dict(), expected) and same(loaded.state_dict(), expected)
    assert result["eval_images"] == 16 and result["source"] == str(run)
    assert caplog.text.count("skipping checkpoint-00000002") == 3


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_checkpoint_folder_named_explicitly_is_refused_naming_the_intact_one(run, how):
    folder = checkpoint.step_folder(run, 2)
    damage(folder / "model.safetensors", how)
    with pytest.raises(CheckpointError) as refused:
        sources.read_source(folder)
    message = str(refused.value)
    assert message.startswith(f"{folder / 'model.safetensors'} {WHY[how]}")
    assert f"{checkpoint.step_folder(run, 1)} is intact: pass it, or the run folder {run}" in message


@pytest.mark.parametrize("command", [evaluate.main, audit.main])
def test_no_intact_checkpoint_is_one_line_and_exit_2(run, command, capsys):
    damage(checkpoint.step_folder(run, 2) / "model.safetensors", "truncate")
    damage(checkpoint.step_folder(run, 1) / "model.safetensors", "flip a bit")
    argv = [str(run), "--dataset", "digits"]
    with pytest.raises(SystemExit) as exited:
        command(argv)
    error = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(error) == 1, error
    assert f"error: no intact checkpoint in {run}: skipping checkpoint-00000002: " in error[0]
    assert "checkpoint-00000001/model.safetensors is corrupt" in error[0]


def test_a_run_without_checkpoints_says_what_it_expected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(model=NAME)))
    with pytest.raises(MissingError, match=r"holds no checkpoint \(expected .*latest and checkpoint-<step>/"):
        sources.read_source(tmp_path)


class _Payload:
    def __reduce__(self):
        return print, ("ran",)


@pytest.mark.parametrize("content", ["garbage", "truncated", "payload"])
@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin"])
def test_an_unreadable_pytorch_file_is_named_without_torchs_unsafe_advice(tmp_path, content, suffix):
    path = tmp_path / f"weights{suffix}"
    if content == "garbage":
        path.write_bytes(b"not a checkpoint" * 8)
    elif content == "truncated":
        torch.save(timm.create_model(NAME).state_dict(), path)
        path.write_bytes(path.read_bytes()[:5000])
    else:
        torch.save({"weight": torch.zeros(2), "payload": _Payload()}, path)
    with pytest.raises(sources.InvalidError) as refused:
        sources.read_source(path)
    message = str(refused.value)
    assert message.startswith(f"{path} is not a readable PyTorch state dict: it is truncated, corrupt, or ")
    assert "pickles more than tensors" in message and ".safetensors" in message
    assert "False" not in message and "\n" not in message  # torch: "`weights_only` set to `False`"


@pytest.mark.parametrize("how", ["garbage", "truncate"])
def test_an_unreadable_safetensors_file_is_named_in_this_projects_words(run, tmp_path, how):
    path = tmp_path / "weights.safetensors"
    if how == "garbage":
        path.write_bytes(b"\xff" * 64)
    else:
        path.write_bytes((checkpoint.step_folder(run, 1) / "model.safetensors").read_bytes()[:3000])
    with pytest.raises(sources.InvalidError) as refused:
        sources.read_source(path)
    message = str(refused.value)
    expected = (
        "is not a readable safetensors file"
        if how == "garbage"
        else "is truncated: 3000 bytes, less than its own header"
    )
    assert message.startswith(f"{path} {expected}")
    assert "Error" not in message and "Header" not in message  # safetensors' words (HeaderTooLarge, ...)


# -- crate.load_run ---------------------------------------------------------------------------------
def test_load_run_gives_the_trained_model_in_eval_mode(run):
    model = crate.load_run(run)
    assert isinstance(model, crate.CRATE) and not model.training
    assert model.num_classes == 10 and model.patch_embed.in_chans == 1
    assert same(model.state_dict(), weights(run, 2))
    assert same(crate.load_run(run, checkpoint=1).state_dict(), weights(run, 1))
    older = crate.load_run(run, checkpoint="checkpoint-00000001")
    assert same(older.state_dict(), weights(run, 1))
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("configured", [3, 0])  # 0: the dataset's, which config.json does not record
def test_eval_and_load_run_build_the_runs_channels(tmp_path, configured):
    model = timm.create_model(NAME, num_classes=4, in_chans=3)
    (tmp_path / "config.json").write_text(json.dumps(dict(model=NAME, num_classes=0, in_chans=configured)))
    checkpoint.save(tmp_path, 1, model, torch.optim.SGD(model.parameters(), lr=0.1))
    for loaded in (crate.load_run(tmp_path), sources.build_model(sources.read_source(tmp_path))[0]):
        assert loaded.patch_embed.in_chans == 3 and loaded.num_classes == 4
        assert same(loaded.state_dict(), model.state_dict())


def test_load_run_of_a_folder_that_is_no_run_names_what_it_expected(run, tmp_path):
    with pytest.raises(
        MissingError, match=rf"{tmp_path / 'nothing'} is not a run folder: expected .*config.json"
    ):
        crate.load_run(tmp_path / "nothing")
    with pytest.raises(MissingError, match=r"is not a run folder"):
        crate.load_run(checkpoint.step_folder(run, 2))
