"""`crate eval`: top-1, top-5, loss and images/s on small data whose answer is known, for CRATE, a
CRATE-α and a timm ViT measured the same way; the JSON result; the errors."""

import contextlib
import io
import json
import math

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from crate import data
from crate.data import Digits
from crate.evaluate import evaluate_source, measure
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


def test_evaluation_of_a_trained_run_repeats_its_own_last_evaluation(trained_run, monkeypatch):
    """The fixture's run evaluated its first 1000 Fashion-MNIST test images (--eval-subset) in bf16
    autocast where the CPU has it; `crate eval` on the same images (--max-images draws a seeded sample:
    here the first 1000 instead) with the same precision policy gives the same numbers."""
    run, final = trained_run
    monkeypatch.setattr("crate.data.sample", lambda dataset, size, seed: data.first(dataset, size))
    result = evaluate_source(str(run), "fashion-mnist", max_images=1000, workers=0, progress=False)
    assert result["eval_images"] == final["eval_images"] == 1000
    assert result["top1"] == final["top1"] and result["top5"] == final["top5"]
    assert math.isclose(result["eval_loss"], final["eval_loss"], rel_tol=1e-6)


def test_the_command_prints_and_writes_json(trained_run, tmp_path, capsys):
    run, _ = trained_run
    output = tmp_path / "result.json"
    cli(["eval", str(run), "--dataset", "digits", "--workers", "0", "--output", str(output)])
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


# -- the data it reads: corrupt images, the dataset flags, the subset, workers, progress -----------------
def _two_class_run(tmp_path, config: dict | None = None):
    """A run folder of crate_mini_patch4_28 for 2 classes that predicts class 0 whatever it sees."""
    model = timm.create_model("crate_mini_patch4_28", num_classes=2)
    state = model.state_dict()
    state["head.weight"] = torch.zeros_like(state["head.weight"])
    state["head.bias"] = torch.tensor([1.0, 0.0])
    run = tmp_path / "run"
    folder = run / "checkpoint-00000001"
    folder.mkdir(parents=True)
    save_file(state, folder / "model.safetensors")
    (run / "config.json").write_text(json.dumps({"model": "crate_mini_patch4_28", **(config or {})}))
    (run / checkpoint.LATEST).write_text(folder.name)
    return run


def _image_folder(root, broken: bool = True):
    """root/a/ and root/b/, 6 PNG and JPEG images each (class-sorted), and a corrupt a/5-broken.jpg."""
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for index in range(6):
            Image.new("L", (28, 28), color=index * 40).save(
                root / label / f"{index}.{'png' if index % 2 else 'jpg'}"
            )
    if broken:
        (root / "a" / "5-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return root / "a" / "5-broken.jpg"


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_image_is_skipped_counted_and_named(tmp_path, caplog, workers):
    """12 readable images and 1 corrupt: 12 evaluated (not 13, the corrupt one replaced by the next),
    the result counts and names the corrupt file, and with workers=0 the log names it once."""
    broken = _image_folder(tmp_path / "images")
    result = evaluate_source(
        str(_two_class_run(tmp_path)), data_root=str(tmp_path / "images"), workers=workers, progress=False
    )
    assert result["dataset"] == "folder" and result["eval_images"] == 12
    assert result["top1"] == pytest.approx(50.0)  # 6 of a, 6 of b: no a counted twice
    assert result["skipped_images"] == 1 and result["skipped_paths"] == [str(broken)]
    if workers == 0:  # a worker's records go to its own log handlers (stderr), not to caplog
        assert caplog.text.count(f"skipping unreadable image {broken}") == 1


def test_a_run_is_evaluated_on_its_own_dataset_with_the_training_flags(tmp_path, capsys):
    """A run's config.json gives the dataset, its folder and its evaluation split; --dataset and --data
    are `crate train`'s, and a dataset name given as --data is refused with the flag that takes it."""
    _image_folder(tmp_path / "images" / "test", broken=False)
    run = _two_class_run(tmp_path, dict(dataset="folder", data=str(tmp_path / "images"), val_split="test"))
    result = evaluate_source(str(run), workers=0, progress=False)
    assert (result["dataset"], result["data"], result["split"]) == (
        "folder",
        str(tmp_path / "images"),
        "test",
    )
    assert result["eval_images"] == 12
    cli(
        ["eval", str(run / "checkpoint-00000001"), "--dataset", "folder", "--split", "test", "--workers", "0"]
    )
    assert json.loads(capsys.readouterr().out)["eval_images"] == 12
    with pytest.raises(SystemExit) as exit_info:
        cli(["eval", str(run), "--data", "digits"])
    assert exit_info.value.code == 2
    assert "--data digits: no such folder" in capsys.readouterr().err
    path = tmp_path / "weights.safetensors"
    save_file(timm.create_model("crate_mini_patch4_28").state_dict(), path)
    with pytest.raises(SystemExit):
        cli(["eval", str(path), "--model", "crate_mini_patch4_28"])
    assert "pass --dataset NAME (and --data ROOT" in capsys.readouterr().err


def test_max_images_draws_a_seeded_subset_not_the_first_class(tmp_path):
    """6 of a class-sorted folder of 6 a's then 6 b's: the first 6 would all be a (top-1 100% for a
    model that always says a); a seeded draw has both classes, the same for the same seed."""
    _image_folder(tmp_path / "images", broken=False)
    run = str(_two_class_run(tmp_path))
    options = dict(data_root=str(tmp_path / "images"), max_images=6, workers=0, progress=False)
    first, again = (evaluate_source(run, **options, seed=0) for _ in range(2))
    assert first["eval_images"] == 6 and 0 < first["top1"] < 100
    assert first["top1"] == again["top1"] and first["eval_loss"] == again["eval_loss"]


def test_workers_default_to_the_cores_and_the_progress_bar_is_throttled_in_a_log(tmp_path, monkeypatch):
    """On 2 cores 2 workers (4 asked for more than the machine has); stderr not a terminal (a log file):
    the progress bar redraws every 30 s, not 10 times a second."""
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    calls = {}
    monkeypatch.setattr(
        "crate.evaluate.evaluate_source", lambda *args, **options: calls.update(options) or {}
    )
    cli(["eval", "x", "--dataset", "digits"])
    assert calls["workers"] == 2
    bars = []
    monkeypatch.setattr("crate.evaluate.tqdm", lambda loader, **options: bars.append(options) or loader)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    measure(
        torch.nn.Linear(4, 2),
        [(torch.randn(3, 4), torch.tensor([0, 1, 0]))],
        torch.device("cpu"),
        contextlib.nullcontext,
        progress=True,
    )
    assert bars[0]["mininterval"] == 30
