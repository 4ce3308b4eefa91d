"""`crate export`: a run's weights in the released key layouts, read back by this project's loader and
by the float64 reference of the released code into the same model; the other family's layout, a
non-CRATE source and a format that contradicts the file name are refused in one line (exit 2); the
file appears whole or not at all."""

import pytest
import torch
from safetensors.torch import load_file

from crate.export import main as export_main
from crate.models import load_official_state_dict
from crate.train import resolve_config, train
from tests.helpers import ALPHA_FAMILY, BOTH_FAMILIES, run_python

LAYOUT = {"crate": "official", "crate_alpha": "alpha"}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """family name -> a run folder of its mini model trained for one step (on 64 Fashion-MNIST images)."""
    runs = {}
    for name, model in [("crate", "crate_mini_patch4_28"), ("crate_alpha", "crate_alpha_mini_patch4_28")]:
        run = tmp_path_factory.mktemp(f"run-{name}")
        options = ["--model", model, "--train-subset", "64", "--eval-subset", "32", "--batch-size", "32"]
        train(resolve_config([*options, "--max-steps", "1", "--telemetry-batch", "4", "--output", str(run)]))
        runs[name] = run
    return runs


def _read(path):
    return load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)


@BOTH_FAMILIES
@pytest.mark.parametrize("suffix, fmt", [(".safetensors", []), (".pth", ["--format", "pth"])])
def test_exported_weights_load_back_into_the_same_model(family, suffix, fmt, tiny_runs, tmp_path, capsys):
    import timm

    from crate.audit import load_model

    run = tiny_runs[family.name]
    output = tmp_path / f"exported{suffix}"
    assert export_main([str(run), "--layout", LAYOUT[family.name], "--output", str(output), *fmt]) == output
    assert f"in the {LAYOUT[family.name]} layout: {output}" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == [output.name]  # no temporary left
    released = _read(output)
    assert "pos_embedding" in released and "mlp_head.1.weight" in released
    assert ("conv1.weight" in released) == (family is ALPHA_FAMILY)

    trained, name = load_model(run)
    fresh = timm.create_model(name, num_classes=trained.num_classes).eval()
    load_official_state_dict(fresh, released)
    images = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fresh(images), trained(images))
    for key, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    # the released code's model (the float64 reference) reads the file as it is
    config = trained.config
    reference = family.make_reference(
        {key: value.double() for key, value in released.items()}, config.heads, config.patch_size, 1
    )
    with torch.no_grad():
        torch.testing.assert_close(reference(images.double()).float(), trained(images), rtol=1e-4, atol=1e-4)


@BOTH_FAMILIES
def test_the_other_familys_layout_is_refused_in_one_line(family, tiny_runs, tmp_path, capsys):
    other = "official" if family is ALPHA_FAMILY else "alpha"
    output = tmp_path / "exported.safetensors"
    with pytest.raises(SystemExit) as exit_:
        export_main([str(tiny_runs[family.name]), "--layout", other, "--output", str(output)])
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    held, wanted = ("CRATE-α", "CRATE") if family is ALPHA_FAMILY else ("CRATE", "CRATE-α")
    assert line.startswith("crate export: error: ")
    assert f"holds {held} weights, but --layout {other} is {wanted}'s released layout" in line
    assert line.endswith(f"use --layout {LAYOUT[family.name]}")
    assert not output.exists()


def test_a_non_crate_source_and_a_contradicting_format_are_refused(tmp_path, capsys):
    from safetensors.torch import save_file

    vit = tmp_path / "vit.safetensors"
    save_file({"blocks.0.mlp.fc1.weight": torch.zeros(2, 2)}, vit)
    for argv, message in [
        (
            [str(vit), "--layout", "official", "--output", str(tmp_path / "x.pth")],
            "holds no CRATE or CRATE-α",
        ),
        (
            [
                str(vit),
                "--layout",
                "official",
                "--output",
                str(tmp_path / "x.pth"),
                "--format",
                "safetensors",
            ],
            "--format safetensors does not match",
        ),
        (
            [str(vit), "--layout", "released", "--output", str(tmp_path / "x.pth")],
            "invalid choice: 'released'",
        ),
    ]:
        with pytest.raises(SystemExit) as exit_:
            export_main(argv)
        (line,) = capsys.readouterr().err.splitlines()
        assert exit_.value.code == 2 and message in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit.safetensors"]


def test_the_crate_command_runs_export(tiny_runs, tmp_path):
    """Registered in `crate`: the wrong layout is one line on stderr and exit 2 from the command line too."""
    output = tmp_path / "x.safetensors"
    process = run_python(
        "crate_cli.py", "export", str(tiny_runs["crate"]), "--layout", "alpha", "--output", str(output)
    )
    text, _ = process.communicate(timeout=120)
    assert process.returncode == 2 and text.count("\n") == 1 and text.startswith("crate export: error: "), (
        text
    )
