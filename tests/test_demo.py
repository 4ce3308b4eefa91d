"""`make demo` (crate.demo): it trains, reports, writes the audit, and a second run reuses the first;
the same for CRATE-α, whose table and audit show the ODL codes."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from crate import demo
from crate.train import resolve_config

SHORT = ["--epochs", "1", "--train-subset", "512", "--eval-subset", "256", "--telemetry-batch", "8"]


# per family: the demo's options, the model it trains, what its console table, audit.json and audit.md show
DEMOS = {
    "crate": dict(
        options=[],
        model="crate_mini_patch7_28",
        console=("non-zero",),
        fields={"nonzero", "lasso_start", "lasso_end"},
        markdown="| non-zero |",
    ),
    "crate_alpha": dict(
        options=["--model", "crate_alpha_mini_patch4_28"],
        model="crate_alpha_mini_patch4_28",
        console=("non-zero codes a2", "LASSO f(0) -> f(a2)"),
        fields={"nonzero_a2", "lasso_step2", "decoder_drift"},
        markdown="non-zero a₂",
    ),
}


@pytest.mark.parametrize("family", list(DEMOS))
def test_demo_trains_reports_writes_the_audit_and_reuses_the_run(family, tmp_path, capsys):
    """CRATE's demo (its default model) and CRATE-α's, whose table and audit show the ODL codes."""
    expected = DEMOS[family]
    demo.main([*expected["options"], "--output", str(tmp_path), *SHORT])
    output = capsys.readouterr().out
    assert f"{expected['model']} on Fashion-MNIST (256 test images): top-1" in output
    assert "Precision: " in output and "Estimated training time on this machine: " in output
    assert "Per-layer white-box measurements on 8 test images" in output
    for column in expected["console"]:
        assert column in output, column
    rows = [line for line in output.splitlines() if line.strip()[:1].isdigit() and "|" in line]
    assert [int(row.split("|")[0]) for row in rows] == list(range(6))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model"] == expected["model"] and 0 <= summary["result"]["top1"] <= 100
    for name in ("audit.json", "audit.md", "layers.png", "attention.png"):
        assert (tmp_path / "audit" / name).is_file() and str(tmp_path / "audit" / name) in output
    audit = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert audit["images"] == 64 and expected["fields"] <= audit["layers"][0].keys()
    assert expected["markdown"] in (tmp_path / "audit" / "audit.md").read_text()
    for name in ("layers.png", "attention.png"):
        assert (tmp_path / "audit" / name).stat().st_size > 10_000

    demo.main([*expected["options"], "--output", str(tmp_path), *SHORT])
    assert "holds a completed run with this configuration" in capsys.readouterr().out


def test_a_run_saved_before_new_options_counts_as_complete(tmp_path):
    config = resolve_config(["--output", str(tmp_path), *SHORT])
    saved = dataclasses.asdict(config)
    for added in ("finetune", "freeze", "opt_betas", "eval_every"):  # options newer than such a run
        del saved[added]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    (tmp_path / "summary.json").write_text(json.dumps({"result": {}}))
    assert demo._completed_run(tmp_path, config) == {"result": {}}
    changed = resolve_config(["--output", str(tmp_path), *SHORT, "--opt-betas", "0.8,0.9"])
    assert demo._completed_run(tmp_path, changed) is None


def _cpu_has_bf16_instructions() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


@pytest.mark.parametrize("amp", ["--no-amp", "--amp"])
def test_demo_says_and_records_its_precision(tmp_path, capsys, amp):
    """--no-amp trains in float32 on every CPU (a CPU without bf16 instructions does so by itself);
    --amp in bf16 exactly where the CPU has bf16 instructions, or on a GPU."""
    demo.main(["--output", str(tmp_path), *SHORT, amp])
    output = capsys.readouterr().out
    bf16 = amp == "--amp" and (torch.cuda.is_available() or _cpu_has_bf16_instructions())
    expected = "bf16 autocast" if bf16 else "float32"
    assert f"Precision: {expected}" in output.splitlines()[0]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["precision"] == ("bfloat16" if bf16 else "float32")
    assert summary["verification"]["passed"] is True and "verified before training" in output
    assert f"1 epochs in {summary['precision']}" in output


def test_the_estimate_counts_the_runs_steps_and_evaluations():
    config = resolve_config([*SHORT, "--epochs", "3", "--eval-every", "2", "--batch-size", "64"])
    seconds, steps, step_s = demo.estimate_training_seconds(config, torch.device("cpu"), timed_steps=1)
    assert steps == 3 * (512 // 64)
    evaluations, eval_batches = 2, 256 / 64  # after epochs 2 and 3 (the last)
    assert seconds == pytest.approx(steps * step_s + evaluations * eval_batches * step_s / 3)
