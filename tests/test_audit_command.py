"""`crate audit`: a run is measured on its own dataset, through `crate eval`'s split and transform, on
images drawn with --seed; --dataset and --data as `crate eval` takes them."""

import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from crate import analysis
from crate.data import Digits, sample
from crate.weights import checkpoint
from crate_cli import main as cli


def _run(tmp_path, dataset: str):
    model = timm.create_model("crate_mini_patch4_28")
    run = tmp_path / "run"
    folder = run / "checkpoint-00000001"
    folder.mkdir(parents=True)
    save_file(model.state_dict(), folder / "model.safetensors")
    (run / "config.json").write_text(json.dumps({"model": "crate_mini_patch4_28", "dataset": dataset}))
    (run / checkpoint.LATEST).write_text(folder.name)
    return run


@pytest.fixture
def audited(monkeypatch, tmp_path):
    """The images and title write_report is given (its plots are tested in tests/test_demo.py)."""
    calls, table = [], tmp_path / "audit.md"
    table.write_text("the table")

    def write_report(model, images, output, **options):
        calls.append((images, options["title"]))
        return dict(markdown=table)

    monkeypatch.setattr(analysis, "write_report", write_report)
    return calls


def _digits_test_images(seed: int, count: int) -> torch.Tensor:
    """``count`` images of the digits test split drawn with ``seed``, normalised as the model's
    pretrained config says (mean 0.286, std 0.353: as training and `crate eval` read them)."""
    test = Digits("test", mean=(0.286,), std=(0.353,))
    chosen = sample(test, count, seed)
    return torch.stack([chosen[index][0] for index in range(count)])


def test_a_digits_run_is_audited_on_digits_with_a_seeded_sample(tmp_path, audited):
    cli(["audit", str(_run(tmp_path, "digits")), "--images", "8"])
    images, title = audited[0]
    assert title == "crate_mini_patch4_28 on digits (validation)"
    assert torch.equal(images, _digits_test_images(0, 8))  # not the first 8, not Fashion-MNIST's


def test_the_dataset_and_the_seed_are_flags(tmp_path, audited):
    cli(
        ["audit", str(_run(tmp_path, "fashion-mnist")), "--dataset", "digits", "--images", "8", "--seed", "3"]
    )
    images, title = audited[0]
    assert title.endswith("on digits (validation)") and torch.equal(images, _digits_test_images(3, 8))
    assert not torch.equal(images, _digits_test_images(0, 8))


def test_a_dataset_name_as_data_names_the_flag(tmp_path, audited, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["audit", str(_run(tmp_path, "fashion-mnist")), "--data", "digits"])
    assert exit_info.value.code == 2 and "name the dataset with --dataset digits" in capsys.readouterr().err
