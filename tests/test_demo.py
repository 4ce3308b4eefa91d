"""`make demo` (crate.demo) and the white-box telemetry it prints (crate.whitebox)."""

import json

import torch

import reference
from crate import CRATE, CRATEConfig, demo, whitebox

SMALL = CRATEConfig(img_size=8, patch_size=2, in_chans=1, num_classes=3, dim=8, depth=2, heads=2)


def test_demo_trains_and_prints_accuracy_and_the_layer_table(tmp_path, capsys):
    demo.main(
        [
            "--output",
            str(tmp_path),
            "--epochs",
            "1",
            "--train-subset",
            "512",
            "--eval-subset",
            "256",
            "--telemetry-batch",
            "8",
        ]
    )
    output = capsys.readouterr().out
    assert "crate_mini_patch4_28 on Fashion-MNIST (256 test images): top-1" in output
    rows = [line for line in output.splitlines() if line.strip()[:1].isdigit() and "|" in line]
    assert [int(row.split("|")[0]) for row in rows] == list(range(6))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model"] == "crate_mini_patch4_28" and 0 <= summary["result"]["top1"] <= 100
    demo.main(
        [
            "--output",
            str(tmp_path),
            "--epochs",
            "1",
            "--train-subset",
            "512",
            "--eval-subset",
            "256",
            "--telemetry-batch",
            "8",
        ]
    )
    assert "holds a completed run with this configuration" in capsys.readouterr().out  # a second run reports


def test_layer_measurements_are_the_reference_functions_on_the_layer_activations():
    model = CRATE(SMALL).double().eval()
    images = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    rows = whitebox.layer_measurements(model, images)
    with torch.no_grad():
        stream = model.embed(images)
        block = model.blocks[0]
        U = block.attn.qkv.weight.reshape(2, 4, 8).transpose(1, 2)
        z_half = stream + block.attn(block.norm1(stream))
        expected_in = reference.compression_rate(block.norm1(stream), U, 0.1, normalize=True)
        expected_out = reference.compression_rate(block.norm1(z_half), U, 0.1, normalize=True)
        expected_nonzero = (block.ista(block.norm2(z_half)) > 0).double().mean((-2, -1))
    torch.testing.assert_close(rows[0]["compression_in"], expected_in, rtol=1e-12, atol=0)
    torch.testing.assert_close(rows[0]["compression_out"], expected_out, rtol=1e-12, atol=0)
    assert torch.equal(rows[0]["nonzero"], expected_nonzero)
    summary = whitebox.summarize(rows)
    assert (
        summary[1]["compression_change"]["mean"]
        == (rows[1]["compression_out"] - rows[1]["compression_in"]).mean()
    )
    assert "layer" in whitebox.format_table(summary)
