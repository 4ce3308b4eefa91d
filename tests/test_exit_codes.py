"""README's exit-code table, row 2, for every subcommand: each input a user can get wrong ends in one
line `crate COMMAND: error: ...` on stderr and exit code 2, no traceback, before any work."""

import pytest
import timm
import torch
from safetensors.torch import save_file

import crate  # noqa: F401  (registers crate_* with timm)
import crate_cli


@pytest.fixture
def files(tmp_path):
    """An empty folder, a corrupt weights file, a weights file of no known model, and a folder that
    looks like ImageNet but is not."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    (tmp_path / "corrupt.pth").write_bytes(b"PK\x03\x04 truncated zip")
    save_file({"weight": torch.zeros(2)}, tmp_path / "stranger.safetensors")
    save_file(timm.create_model("crate_mini_patch7_28").state_dict(), tmp_path / "mini.safetensors")
    return tmp_path


MINI = ["{tmp}/mini.safetensors", "--model", "crate_mini_patch7_28"]
CASES = {
    "crate: unknown command": (["fly"], "crate: error: unknown command 'fly'"),
    "train: unknown option": (["train", "--no-such-option", "1"], "unrecognized arguments"),
    "train: unknown model": (["train", "--model", "no_such_model"], "--model"),
    "train: bad value": (["train", "--lr", "-1"], "--lr must be positive"),
    "train: bad type": (["train", "--epochs", "ten"], "--epochs"),
    "train: resume nothing": (["train", "--output", "{tmp}/empty", "--resume"], "holds no run"),
    "train: missing data": (["train", "--data", "{tmp}/nowhere", "--output", "{tmp}/run"], "--data"),
    "train: no imagenet": (
        ["train", "--dataset", "imagenet", "--data", "{tmp}/empty", "--output", "{tmp}/run"],
        "ImageNet not found",
    ),
    "train: missing finetune source": (
        ["train", "--finetune", "{tmp}/nowhere.pth", "--output", "{tmp}/run", "--max-steps", "1"],
        "nowhere.pth",
    ),
    "train: corrupt finetune source": (
        ["train", "--finetune", "{tmp}/corrupt.safetensors", "--output", "{tmp}/run", "--max-steps", "1"],
        "corrupt.safetensors",
    ),
    "eval: missing source": (["eval", "{tmp}/nowhere"], "nowhere"),
    "eval: corrupt source": (["eval", "{tmp}/corrupt.pth", "--model", "crate_mini_patch7_28"], "corrupt.pth"),
    "eval: unknown dataset": (["eval", *MINI, "--dataset", "no-such-set"], "no-such-set"),
    "eval: a dataset name as --data": (["eval", *MINI, "--data", "digits"], "--dataset digits"),
    "eval: missing folder": (["eval", *MINI, "--dataset", "folder", "--data", "{tmp}/nowhere"], "nowhere"),
    "audit: unknown dataset": (["audit", *MINI, "--dataset", "no-such-set"], "no-such-set"),
    "audit: missing source": (["audit", "{tmp}/nowhere"], "nowhere"),
    "audit: stranger weights": (["audit", "{tmp}/stranger.safetensors"], "stranger.safetensors"),
    "verify: missing source": (["verify", "{tmp}/nowhere"], "nowhere"),
    "verify: bad precision": (["verify", "crate_mini_patch7_28", "--precision", "fp8"], "--precision"),
    "verify: stranger weights": (
        ["verify", "{tmp}/stranger.safetensors", "--model", "crate_mini_patch7_28"],
        "stranger.safetensors",
    ),
    "export: missing source": (
        ["export", "{tmp}/nowhere", "--layout", "official", "--output", "{tmp}/x"],
        "nowhere",
    ),
    "export: no layout": (["export", "{tmp}/corrupt.pth", "--output", "{tmp}/x"], "--layout"),
    "export: stranger weights": (
        ["export", "{tmp}/stranger.safetensors", "--layout", "official", "--output", "{tmp}/x.safetensors"],
        "stranger.safetensors",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_every_user_error_is_one_line_and_exit_code_2(case, files, capsys):
    argv, expected = CASES[case]
    with pytest.raises(SystemExit) as stop:
        crate_cli.main([arg.replace("{tmp}", str(files)) for arg in argv])
    error = capsys.readouterr().err
    command = "crate" if argv[0] not in crate_cli.COMMANDS else f"crate {argv[0]}"
    assert stop.value.code == 2, error
    assert error.startswith(f"{command}: error: ") and error.count("\n") == 1, error
    assert expected in error and "Traceback" not in error
