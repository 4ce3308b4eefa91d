"""`make demo` (crate.demo): it trains, reports, writes the audit, and a second run reuses the first."""

import json

from crate import demo

SHORT = ["--epochs", "1", "--train-subset", "512", "--eval-subset", "256", "--telemetry-batch", "8"]


def test_demo_trains_reports_and_writes_the_audit(tmp_path, capsys):
    demo.main(["--output", str(tmp_path), *SHORT])
    output = capsys.readouterr().out
    assert "crate_mini_patch4_28 on Fashion-MNIST (256 test images): top-1" in output
    rows = [line for line in output.splitlines() if line.strip()[:1].isdigit() and "|" in line]
    assert [int(row.split("|")[0]) for row in rows] == list(range(6))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model"] == "crate_mini_patch4_28" and 0 <= summary["result"]["top1"] <= 100
    for name in ("audit.json", "audit.md", "layers.png", "attention.png"):
        assert (tmp_path / "audit" / name).is_file() and str(tmp_path / "audit" / name) in output

    demo.main(["--output", str(tmp_path), *SHORT])
    assert "holds a completed run with this configuration" in capsys.readouterr().out
