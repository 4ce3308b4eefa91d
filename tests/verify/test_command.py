"""`crate verify SOURCE`: every kind of source (a model name, a run folder, a released-layout file)
checked and reported as a table and JSON; an injected fault exits 70 naming the layer; a source or
option that cannot be checked exits 2 with one line."""

import json

import pytest
import torch

from crate.models.released import export_official_state_dict
from crate.verify import EXIT_FAILED
from crate.verify.command import main
from tests.helpers import FAST, released_alpha_pth
from tests.verify.faults import inject

COLUMNS = "path      part     quantity" + " " * 37 + "error     plain  ratio     bound  verdict"


def _verify(*args: str) -> int:
    try:
        main(list(args))
    except SystemExit as stop:
        return stop.code
    return 0


def test_a_model_name_is_checked_at_a_seeded_initialisation(tmp_path, capsys):
    table = tmp_path / "verification.json"
    assert _verify("crate_mini_patch7_28", "--precision", "float32", "--json", str(table)) == 0
    out = capsys.readouterr().out
    assert COLUMNS in out and "passed:" in out
    saved = json.loads(table.read_text())
    assert saved["passed"] and saved["precision"] == "float32" and saved["source"] == "crate_mini_patch7_28"
    assert {"path", "part", "quantity", "fast", "plain", "ratio", "bound", "holds"} <= saved["rows"][0].keys()
    # train: the embedding's output and 8 gradients, per layer output and 9, the head's output and 5,
    # the model's output; inference: the embedding, z_half and output per layer, the head, the model
    assert len(saved["rows"]) == (9 + 6 * 10 + 6 + 1) + (1 + 6 * 2 + 1 + 1)


@pytest.mark.parametrize("precision", ["float32", "bf16", "bf16-autocast"])
def test_a_released_alpha_file_passes(tmp_path, capsys, precision):
    """Released CRATE-α key names (UCSC-VLAA/CRATE-alpha's layout), read as --finetune reads them."""
    weights = tmp_path / "crate_alpha_mini.pth"
    released_alpha_pth(weights)
    args = [str(weights), "--model", "crate_alpha_mini_patch4_28", "--precision", precision]
    assert _verify(*args, "--quiet", "--json", str(tmp_path / "v.json")) == 0, capsys.readouterr().out


def test_a_trained_run_folder_passes_and_a_released_crate_file_of_it_too(tmp_path, capsys):
    from crate.train.command import main as train
    from tests.helpers import latest_weights

    run = tmp_path / "run"
    train([*FAST, "--model", "crate_mini_patch4_28", "--max-steps", "16", "--output", str(run)])
    assert _verify(str(run), "--precision", "float32", "--quiet", "--json", str(tmp_path / "a.json")) == 0
    released = tmp_path / "crate_mini.pth"
    torch.save(export_official_state_dict(latest_weights(run), "CRATE"), released)
    args = [str(released), "--model", "crate_mini_patch4_28", "--quiet", "--json", str(tmp_path / "b.json")]
    assert _verify(*args) == 0, capsys.readouterr().out


def test_an_injected_fault_exits_70_naming_the_layer(tmp_path, monkeypatch, capsys):
    inject(monkeypatch, "ISTA downcast to bfloat16")
    table = tmp_path / "v.json"
    assert _verify("crate_mini_patch7_28", "--precision", "float32", "--json", str(table)) == EXIT_FAILED
    out = capsys.readouterr().out
    assert "FAILED" in out and "first: train layer 0 output" in out
    assert not json.loads(table.read_text())["passed"]


def test_a_crate_mae_model_name_is_checked_part_by_part(tmp_path, capsys):
    table = tmp_path / "verification.json"
    assert _verify("crate_mae_mini_patch4_28", "--precision", "float32", "--json", str(table)) == 0
    out = capsys.readouterr().out
    assert "crate_mae_mini_patch4_28 from crate_mae_mini_patch4_28" in out and "passed:" in out
    assert "path      part      quantity" in out and "inference decoder 3 output" in out
    saved = json.loads(table.read_text())
    assert saved["passed"] and saved["options"]["mask_ratio"] == 0.75
    # train: the embedding's output and 5 gradients, per encoder and decoder layer 2 outputs and 9
    # gradients, the norm's output and 3, the head's and 5, the loss's and 1, the model's mask, loss and
    # pred; inference: the same outputs
    assert len(saved["rows"]) == (6 + 8 * 11 + 4 + 6 + 2 + 3) + (1 + 8 * 2 + 1 + 1 + 1 + 3)


def test_a_crate_mae_fault_exits_70_naming_the_part(tmp_path, monkeypatch, capsys):
    inject(monkeypatch, "MAE decoder sign flipped")
    args = [
        "crate_mae_mini_patch4_28",
        "--precision",
        "float32",
        "--quiet",
        "--json",
        str(tmp_path / "v.json"),
    ]
    assert _verify(*args) == EXIT_FAILED
    assert "first: train decoder 0 output" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["no/such/run"], "neither a file or folder"),
        (["crate_mini_patch7_28", "--img-size", "30"], "not divisible by patch_size=7"),
        (["vit_mini_patch4_28"], "neither CRATE nor CRATE-α"),
    ],
)
def test_what_cannot_be_checked_exits_2_with_one_line(tmp_path, capsys, args, message):
    assert _verify(*args, "--json", str(tmp_path / "v.json")) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("crate verify: error: ") and message in error and "\n" not in error
