"""The gate in `crate train` (crate/train/verification.py): it runs before the first step on the run's
device, precision and options, after --resume and --finetune loading; a failure stops the run with
exit 70 before any step and with no checkpoint; --skip-verify trains anyway, loudly and recorded; the
gate changes nothing the run computes."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from crate.train import train
from crate.train.command import main
from crate.verify import EXIT_FAILED
from crate.weights import checkpoint
from tests.helpers import FAST, fast_config, latest_weights
from tests.verify.faults import inject

STEPS = ["--max-steps", "4", "--checkpoint-every", "2"]


def _records(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def fast_config_args(output) -> list[str]:
    return [*FAST, "--output", str(output)]


def test_a_failing_gate_stops_before_any_step_with_exit_70(tmp_path, monkeypatch, capsys):
    inject(monkeypatch, "attention scale off")
    with pytest.raises(SystemExit) as stop:
        main([*fast_config_args(tmp_path), *STEPS])
    assert stop.value.code == EXIT_FAILED
    assert not list(tmp_path.glob("checkpoint-*"))
    saved = json.loads((tmp_path / "verification.json").read_text())
    assert saved["passed"] is False and "layer 0" in saved["verdict"]
    assert saved["reports"][0]["rows"] and saved["reports"][0]["device"] == "cpu"
    (record,) = _records(tmp_path)  # the gate's line, no step's
    assert record["event"] == "verification" and record["passed"] is False and record["step"] == 0


def test_skip_verify_trains_anyway_loudly_and_recorded(tmp_path, monkeypatch, caplog):
    inject(monkeypatch, "attention scale off")
    with caplog.at_level(logging.WARNING, logger="crate.train"):
        train(fast_config(tmp_path, *STEPS, "--skip-verify"))
    assert "WITHOUT checking" in caplog.text
    assert list(tmp_path.glob("checkpoint-*"))
    saved = json.loads((tmp_path / "verification.json").read_text())
    assert saved["skipped"] is True and saved["passed"] is None
    first = _records(tmp_path)[0]
    assert first["event"] == "verification" and first["skipped"] is True and first["passed"] is None


def test_the_gate_changes_nothing_the_run_computes(tmp_path):
    """A gated run and a --skip-verify run end with byte-identical weights (the gate draws no random
    number from the run's streams and leaves the model as it found it)."""
    train(fast_config(tmp_path / "gated", *STEPS, "--drop-path", "0.1"))
    train(fast_config(tmp_path / "skipped", *STEPS, "--drop-path", "0.1", "--skip-verify"))
    gated, skipped = latest_weights(tmp_path / "gated"), latest_weights(tmp_path / "skipped")
    assert all(torch.equal(gated[key], skipped[key]) for key in gated)
    assert json.loads((tmp_path / "gated" / "verification.json").read_text())["passed"] is True


def test_a_resumed_run_checks_the_weights_it_loaded(tmp_path, monkeypatch):
    """The gate of a resumed run checks the restored weights: a fault injected only for the second
    session stops it at the checkpoint's step, which stays the newest."""
    planned = ["--max-steps", "8", "--checkpoint-every", "2"]
    train(fast_config(tmp_path, *planned, "--stop-after", "4"))
    weights = load_file(checkpoint.latest(tmp_path) / "model.safetensors")
    inject(monkeypatch, "attention scale off")
    with pytest.raises(SystemExit) as stop:
        main([*fast_config_args(tmp_path), *planned, "--resume"])
    assert stop.value.code == EXIT_FAILED
    record = _records(tmp_path)[-1]
    assert record["event"] == "verification" and record["step"] == 4 and record["passed"] is False
    after = load_file(checkpoint.latest(tmp_path) / "model.safetensors")
    assert all(torch.equal(weights[key], after[key]) for key in weights)


def test_a_finetuned_run_checks_the_loaded_weights(tmp_path):
    source = tmp_path / "source"
    train(fast_config(source, *STEPS))
    train(fast_config(tmp_path / "tuned", "--finetune", str(source), "--max-steps", "2"))
    saved = json.loads((tmp_path / "tuned" / "verification.json").read_text())
    assert saved["passed"] is True and saved["reports"][0]["model"] == "crate_mini_patch7_28"


def test_a_model_without_reference_is_recorded_as_not_checked(tmp_path):
    train(fast_config(tmp_path, "--model", "vit_mini_patch4_28", "--max-steps", "2"))
    saved = json.loads((tmp_path / "verification.json").read_text())
    assert saved["skipped"] is True and saved["passed"] is None and saved["ranks"] == 0
