"""`make demo` (crate.demo): the per-layer table is printed and its numbers are the reference's."""

import torch

import reference
from crate import demo


def test_demo_prints_one_row_per_layer(capsys):
    demo.main(["--depth", "3", "--dim", "16", "--heads", "2", "--batch", "4"])
    output = capsys.readouterr().out
    rows = [line for line in output.splitlines() if line.strip()[:1].isdigit()]
    assert [int(row.split("|")[0]) for row in rows] == [0, 1, 2]
    assert "R^c in" in output and "non-zero" in output


def test_layer_measurements_are_the_reference_functions_on_the_layer_activations():
    sizes = dict(
        dim=8, depth=2, heads=2, head_dim=4, patch_size=7, channels=1, num_patches=16, num_classes=10
    )
    state = reference.random_official_state_dict(**sizes, generator=torch.Generator().manual_seed(1))
    model = reference.OfficialCRATE.from_state_dict(state, heads=2, patch_size=7, channels=1)
    images = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    rows = demo.layer_measurements(model, images)
    with torch.no_grad():
        stream = model.embed(images)
        mssa, ista = model.transformer.layers[0]
        U = state["transformer.layers.0.0.fn.qkv.weight"].reshape(2, 4, 8).transpose(1, 2)
        z_half = stream + mssa(stream)
        expected_in = reference.compression_rate(mssa.norm(stream), U, 0.1, normalize=True)
        expected_out = reference.compression_rate(mssa.norm(z_half), U, 0.1, normalize=True)
        expected_nonzero = (ista(z_half) > 0).double().mean((-2, -1))
    assert torch.equal(rows[0]["compression_in"], expected_in)
    assert torch.equal(rows[0]["compression_out"], expected_out)
    assert torch.equal(rows[0]["nonzero"], expected_nonzero)
