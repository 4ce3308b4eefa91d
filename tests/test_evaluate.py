"""`crate eval`: top-1, top-5, loss and images/s on small data whose answer is known, for CRATE, a
CRATE-α and a timm ViT measured the same way; the JSON result; the errors."""

import json
import math

import pytest
import timm
import torch
from safetensors.torch import save_file

from crate.data import Digits
from crate.evaluate import evaluate_source
from crate.weights import checkpoint
from crate_cli import main as cli


def _constant_classifier(tmp_path, name: str):
    """A run folder whose model ignores the image: its classifier has zero weights and the biases
    10, 9, ..., 1, so it predicts class 0 first, then 1, ... whatever it sees."""
    model = timm.create_model(name)
    state = model.state_dict()
    state["head.weight"] = torch.zeros_like(state["head.weight"])
    state["head.bias"] = torch.arange(10, 0, -1, dtype=torch.float32)
    folder = tmp_path / name / "checkpoint-00000001"
    folder.mkdir(parents=True)
    save_file(state, folder / "model.safetensors")
    (tmp_path / name / "config.json").write_text(json.dumps({"model": name}))
    (tmp_path / name / checkpoint.LATEST).write_text(folder.name)
    return tmp_path / name


@pytest.mark.parametrize("name", ["crate_mini_patch4_28", "crate_alpha_mini_patch4_28", "vit_mini_patch4_28"])
def test_a_known_answer_on_the_digits_test_split(tmp_path, name):
    """top-1 = the share of 0s, top-5 = the share of 0–4s, loss = the cross-entropy of the fixed logits."""
    targets = Digits("test").targets
    result = evaluate_source(
        str(_constant_classifier(tmp_path, name)), "digits", workers=0, amp=False, progress=False
    )
    assert result["eval_images"] == len(targets) == 539
    assert result["top1"] == pytest.approx(100 * (targets == 0).sum().item() / len(targets), abs=1e-12)
    assert result["top5"] == pytest.approx(100 * (targets < 5).sum().item() / len(targets), abs=1e-12)
    log_probabilities = torch.log_softmax(torch.arange(10, 0, -1, dtype=torch.float64), 0)
    assert result["eval_loss"] == pytest.approx(-log_probabilities[targets].mean().item(), rel=1e-6)
    assert result["model"] == name and result["precision"] == "float32" and result["eval_images_per_s"] > 0


def test_evaluation_of_a_trained_run_repeats_its_own_last_evaluation(trained_run):
    """The fixture's run evaluated its first 1000 Fashion-MNIST test images in bf16 autocast where the
    CPU has it; `crate eval` on the same images with the same precision policy gives the same numbers."""
    run, final = trained_run
    result = evaluate_source(str(run), "fashion-mnist", max_images=1000, workers=0, progress=False)
    assert result["eval_images"] == final["eval_images"] == 1000
    assert result["top1"] == final["top1"] and result["top5"] == final["top5"]
    assert math.isclose(result["eval_loss"], final["eval_loss"], rel_tol=1e-6)


def test_the_command_prints_and_writes_json(trained_run, tmp_path, capsys):
    run, _ = trained_run
    output = tmp_path / "result.json"
    cli(["eval", str(run), "--data", "digits", "--workers", "0", "--output", str(output)])
    written = json.loads(output.read_text())
    assert json.loads(capsys.readouterr().out) == written
    assert written["dataset"] == "digits" and written["eval_images"] == 539 and 0 <= written["top1"] <= 100


def test_more_classes_than_the_model_predicts_is_refused(tmp_path):
    run = tmp_path / "run"
    model = timm.create_model("crate_mini_patch4_28", num_classes=3)
    folder = run / "checkpoint-00000001"
    folder.mkdir(parents=True)
    save_file(model.state_dict(), folder / "model.safetensors")
    (run / "config.json").write_text(json.dumps({"model": "crate_mini_patch4_28"}))
    (run / checkpoint.LATEST).write_text(folder.name)
    with pytest.raises(ValueError, match=r"digits has 10 classes, but crate_mini_patch4_28 predicts 3"):
        evaluate_source(str(run), "digits", workers=0, progress=False)


def test_a_weights_file_without_config_needs_the_architecture(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file(timm.create_model("crate_mini_patch4_28").state_dict(), path)
    with pytest.raises(ValueError, match=r"names no architecture .*pass the timm model name"):
        evaluate_source(str(path), "digits", workers=0, progress=False)
    result = evaluate_source(
        str(path), "digits", model_name="crate_mini_patch4_28", workers=0, progress=False
    )
    assert result["eval_images"] == 539
