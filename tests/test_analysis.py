"""crate.analysis and `crate audit`, both families (parametrized where a check is the same for both): the
report's numbers are the reference's functions on the same activations, the pictures are written, and
the measure tells a working MSSA step from a broken one. For CRATE-α: the LASSO does not increase over
the ODL block's two steps when η‖D‖₂² ≤ 2 (the descent theorem, docs/crate-alpha.md §2) and visibly can
beyond it, the tables and the plot show the codes' columns, and the command reads a CRATE-α run folder,
a .safetensors and a released .pth."""

import copy
import json

import pytest
import timm
import torch
import torch.nn.functional as F

import reference
from crate import CRATE, CRATEAlpha, CRATEAlphaConfig, CRATEConfig, analysis
from crate.audit import load_images, load_model
from crate.audit import main as audit_main
from crate.train import resolve_config, train
from crate.weights import checkpoint
from tests.helpers import ALPHA_FAMILY, BOTH_FAMILIES, released_alpha_pth

SMALL = CRATEConfig(img_size=8, patch_size=2, in_chans=1, num_classes=3, dim=8, depth=2, heads=2)
SMALL_ALPHA = CRATEAlphaConfig(**SMALL.__dict__)
ALPHA_FIELDS = {
    "compression_in",
    "compression_out",
    "compression_change",
    "raw_compression_in",
    "raw_compression_out",
    "nonzero_a1",
    "nonzero_a2",
    "eta_lipschitz",
    "lasso_start",
    "lasso_step1",
    "lasso_step2",
    "decoder_drift",
    "orthonormality_gap",
    "head_coherence",
}


def _ln(x, norm):
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


@BOTH_FAMILIES
def test_audit_numbers_are_the_reference_functions_on_the_layer_activations(family):
    alpha = family is ALPHA_FAMILY
    model = family.model_class(SMALL_ALPHA if alpha else SMALL).double().eval()
    images = torch.randn(4, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    layers = analysis.audit(model, images)
    if alpha:
        assert [set(r) - {"layer"} for r in layers] == [ALPHA_FIELDS] * 2
    block = model.blocks[1]
    with torch.no_grad():
        x = model.blocks[0](model.embed(images))
        z_half = block.compress(x)
        out = block.sparsify(z_half)
    U = block.attn.qkv.weight.reshape(2, 4, 8).transpose(1, 2)
    expected = {
        "compression_in": reference.compression_rate(_ln(x, block.norm1), U, 0.1, normalize=True),
        "compression_out": reference.compression_rate(_ln(z_half, block.norm1), U, 0.1, normalize=True),
        "raw_compression_in": reference.compression_rate(_ln(x, block.norm1), U, 0.1),
        "raw_compression_out": reference.compression_rate(_ln(z_half, block.norm1), U, 0.1),
    }
    if alpha:
        D, D1, eta, lam = block.odl.D, block.odl.D1, block.odl.eta, block.odl.lam
        u = _ln(z_half, block.norm2)
        a1, a2 = reference.proximal_gradient_steps(u, D.detach(), eta, lam, steps=2)  # autograd, from zero
        # the audit's codes are the reference's iterates, and the model's output decodes the second
        _, codes1, codes2 = analysis.alpha_codes(block, z_half)
        assert codes1.dtype == torch.float64
        torch.testing.assert_close(codes1, a1, rtol=0, atol=1e-12)
        torch.testing.assert_close(codes2, a2, rtol=0, atol=1e-12)
        torch.testing.assert_close(out - z_half, a2 @ D1.T, rtol=0, atol=1e-12)
        expected |= {
            "nonzero_a1": (a1 > 0).double().mean((-2, -1)),
            "nonzero_a2": (a2 > 0).double().mean((-2, -1)),
            "lasso_start": 0.5 * (u**2).sum((-2, -1)),  # f(0) = ½‖u‖²
            "lasso_step1": reference.lasso_objective(a1, u, D, lam),
            "lasso_step2": reference.lasso_objective(a2, u, D, lam),
        }
        at_zero = reference.lasso_objective(torch.zeros_like(a1), u, D, lam)
        torch.testing.assert_close(expected["lasso_start"], at_zero, rtol=1e-14, atol=0)
    else:
        D, u, eta = block.ista.weight, _ln(z_half, block.norm2), 0.1
        expected |= {
            "nonzero": (out > 0).double().mean((-2, -1)),
            "lasso_end": reference.lasso_objective(out, u, D, 0.1),
            "lasso_start": 0.5 * ((u.transpose(1, 2) - D @ u.transpose(1, 2)) ** 2).sum((1, 2))
            + 0.1 * u.abs().sum((1, 2)),
        }
    for key, values in expected.items():
        assert layers[1][key]["mean"] == pytest.approx(values.mean().item(), rel=1e-12), key
        assert layers[1][key]["std"] == pytest.approx(values.std().item(), rel=1e-9, abs=1e-12), key
    assert layers[1]["eta_lipschitz"] == pytest.approx(eta * torch.linalg.matrix_norm(D, ord=2).item() ** 2)
    if alpha:
        assert layers[1]["decoder_drift"] == pytest.approx(((D1 - D).norm() / D.norm()).item(), rel=1e-12)
    gap = max(
        torch.linalg.matrix_norm(U[k].T @ U[k] - torch.eye(4, dtype=torch.float64), ord=2) for k in range(2)
    )
    assert layers[1]["orthonormality_gap"] == pytest.approx(gap.item())


def test_orthonormal_disjoint_heads_have_no_gap_and_no_coherence():
    Q = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64)).Q
    U = Q.T.reshape(2, 4, 8).transpose(1, 2)  # two heads spanning orthogonal halves
    assert analysis.orthonormality_gap(U) < 1e-12
    assert analysis.coherence(U) < 1e-12
    assert analysis.coherence(torch.cat([U[:1], U[:1]])) == pytest.approx(1.0)


@BOTH_FAMILIES
def test_attention_maps_and_pca_have_the_patch_grid_shape(family):
    model = family.model_class(SMALL_ALPHA if family is ALPHA_FAMILY else SMALL).eval()
    images = torch.randn(3, 1, 8, 8)
    maps = analysis.attention_maps(model, images, layer=0)
    assert maps.shape == (3, 2, 4, 4) and (maps >= 0).all() and (maps.sum((-2, -1)) <= 1 + 1e-6).all()
    pca = analysis.patch_pca(model, images)
    assert pca.shape == (3, 3, 4, 4) and pca.min() >= 0 and pca.max() <= 1


def test_attention_plot_works_with_patch_8_models(tmp_path):
    model = CRATE(
        CRATEConfig(img_size=32, patch_size=8, in_chans=3, num_classes=0, dim=12, depth=2, heads=3)
    ).eval()
    images = torch.randn(2, 3, 32, 32)
    assert analysis.attention_maps(model, images).shape == (2, 3, 4, 4)
    path = analysis.plot_attention(model, images, tmp_path / "attention.png", mean=(0.5,) * 3, std=(0.5,) * 3)
    assert path.stat().st_size > 10_000


def test_audit_command_writes_json_markdown_and_plots(trained_run, tmp_path, capsys):
    run, _ = trained_run
    paths = audit_main([str(run), "--images", "16", "--output", str(tmp_path)])
    report = json.loads(paths["json"].read_text())
    assert report["images"] == 16 and len(report["layers"]) == 6
    assert "| layer | R^c in |" in capsys.readouterr().out
    for kind in ("layers", "attention"):
        assert paths[kind].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[kind].stat().st_size > 10_000


def test_image_folder_data_is_read_for_the_model(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.new("L", (40, 30), color=40 * i).save(tmp_path / f"{i}.png")
    model = CRATE(CRATEConfig(img_size=28, patch_size=4, in_chans=1, dim=8, depth=1, heads=2))
    assert load_images(model, "folder", str(tmp_path), "validation", 8).shape == (3, 1, 28, 28)
    with pytest.raises(FileNotFoundError, match="empty: no images there"):
        load_images(model, "folder", str(tmp_path / "empty"), "validation", 8)


class _MatchedNoise(torch.nn.Module):
    """A broken MSSA: random per-token directions with the norms of the real MSSA output."""

    def __init__(self, attn):
        super().__init__()
        self.inner, self.qkv, self.heads = attn, attn.qkv, attn.heads

    def forward(self, y):
        o = self.inner(y)
        noise = torch.randn(o.shape, generator=torch.Generator().manual_seed(0), dtype=o.dtype)
        return noise / noise.norm(dim=-1, keepdim=True) * o.norm(dim=-1, keepdim=True)

    def attention(self, y):
        return self.inner.attention(y)


def test_broken_mssa_raises_compression_where_the_trained_one_lowers_it(trained_run):
    """Layer by layer (the layers before it unchanged), replacing the MSSA output with matched-norm
    noise raises R^c wherever the trained model's MSSA lowers it."""
    model, _ = load_model(trained_run[0])
    images = load_images(model, "fashion-mnist", None, "test", 32)
    trained = analysis.audit(model, images)
    lowered = [r["layer"] for r in trained if r["compression_change"]["mean"] < 0]
    assert lowered, "the trained model's MSSA lowers R^c in no layer"
    for layer in lowered:
        broken = copy.deepcopy(model)
        broken.blocks[layer].attn = _MatchedNoise(broken.blocks[layer].attn)
        assert analysis.audit(broken, images)[layer]["compression_change"]["mean"] > 0, layer


def test_tied_decoder_has_no_drift():
    model = CRATEAlpha(SMALL_ALPHA).eval()
    with torch.no_grad():
        model.blocks[0].odl.D1.copy_(model.blocks[0].odl.D)
    layers = analysis.audit(model, torch.randn(2, 1, 8, 8))
    assert layers[0]["decoder_drift"] == 0 and layers[1]["decoder_drift"] > 0.5


@pytest.fixture(scope="module")
def untrained():
    """crate_alpha_mini_patch4_28 at its seed-0 initialisation and 16 Fashion-MNIST test images."""
    torch.manual_seed(0)
    model = timm.create_model("crate_alpha_mini_patch4_28").eval()
    return model, load_images(model, "fashion-mnist", None, "test", 16)


def test_lasso_does_not_increase_over_the_two_odl_steps_when_the_step_size_allows(untrained):
    """The descent theorem: from the zero start with η‖D‖₂² ≤ 2, every proximal-gradient step obeys
    η(f(a_k) − f(a_{k+1})) ≥ (1 − η‖D‖₂²/2)‖a_{k+1} − a_k‖², per image; the audit's means follow."""
    model, images = untrained
    layers = analysis.audit(model, images)
    states = model.forward_intermediates(images, intermediates_only=True, return_layer_states=True)
    for row, state, block in zip(layers, states, model.blocks, strict=True):
        assert row["eta_lipschitz"] <= 2, row["layer"]  # the theorem's condition (≈ 0.43 at the init)
        assert row["lasso_start"]["mean"] > row["lasso_step1"]["mean"] > row["lasso_step2"]["mean"]
        u, a1, a2 = analysis.alpha_codes(block, state.mssa)
        D, eta, lam = block.odl.D.double(), block.odl.eta, block.odl.lam
        iterates = [torch.zeros_like(a1), a1, a2]
        values = [reference.lasso_objective(a, u, D, lam) for a in iterates]
        for k in range(2):
            step = ((iterates[k + 1] - iterates[k]) ** 2).sum((-2, -1))
            decrease = eta * (values[k] - values[k + 1])
            tolerance = 1e-10 * values[k].abs()
            assert (decrease >= (1 - row["eta_lipschitz"] / 2) * step - tolerance).all(), (row["layer"], k)


def test_audit_shows_the_lasso_rising_when_the_step_size_condition_fails(untrained):
    """Negative control: D scaled by 3 (η‖D‖₂² ≈ 3.9 > 2) makes the second step raise the LASSO."""
    model, images = untrained
    scaled = timm.create_model("crate_alpha_mini_patch4_28").eval()
    scaled.load_state_dict(model.state_dict())
    with torch.no_grad():
        for block in scaled.blocks:
            block.odl.D.mul_(3)
    layers = analysis.audit(scaled, images)
    assert all(r["eta_lipschitz"] > 2 for r in layers)
    assert any(r["lasso_step2"]["mean"] > r["lasso_step1"]["mean"] for r in layers)


def test_tables_and_plot_show_the_codes_columns(untrained, tmp_path):
    model, images = untrained
    layers = analysis.audit(model, images[:4])
    table = analysis.markdown_table(layers)
    assert "| non-zero a₁ | non-zero a₂ |" in table and "LASSO f(0) → f(a₁) → f(a₂)" in table
    assert "‖D₁ − D‖/‖D‖" in table and len(table.splitlines()) == 2 + 6
    console = analysis.format_table(layers)
    assert "non-zero codes a2" in console and "LASSO f(0) -> f(a2)" in console
    assert [int(line.split("|")[0]) for line in console.splitlines()[2:]] == list(range(6))
    path = analysis.plot_layers(layers, tmp_path / "layers.png", "untrained CRATE-α")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_audit_command_reads_an_alpha_run_folder_safetensors_and_released_pth(tmp_path, capsys):
    run = tmp_path / "run"
    train(
        resolve_config(
            [
                "--model",
                "crate_alpha_mini_patch4_28",
                "--train-subset",
                "64",
                "--eval-subset",
                "32",
                "--batch-size",
                "32",
                "--max-steps",
                "1",
                "--telemetry-batch",
                "4",
                "--output",
                str(run),
            ]
        )
    )
    paths = audit_main([str(run), "--images", "8", "--output", str(tmp_path / "from-run")])
    report = json.loads(paths["json"].read_text())
    assert report["images"] == 8 and [set(r) - {"layer"} for r in report["layers"]] == [ALPHA_FIELDS] * 6
    assert "| non-zero a₁ | non-zero a₂ |" in capsys.readouterr().out
    assert "LASSO f(0) → f(a₁) → f(a₂)" in paths["markdown"].read_text()
    for kind in ("layers", "attention"):
        assert paths[kind].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[kind].stat().st_size > 10_000

    weights = checkpoint.latest(run) / "model.safetensors"
    options = ["--model", "crate_alpha_mini_patch4_28", "--images", "8", "--output"]
    paths = audit_main([str(weights), *options, str(tmp_path / "st")])
    assert json.loads(paths["json"].read_text())["layers"] == report["layers"]  # the same weights

    pth = tmp_path / "crate_alpha_mini.pth"
    released = released_alpha_pth(pth)
    model, _ = load_model(pth, "crate_alpha_mini_patch4_28")
    assert isinstance(model, CRATEAlpha)
    assert torch.equal(model.blocks[2].odl.D1, released["transformer.layers.2.1.fn.D1"].float())
    assert torch.equal(model.patch_embed.proj.weight, released["conv1.weight"].float())
    paths = audit_main([str(pth), "--dataset", "fashion-mnist", *options, str(tmp_path / "pth")])
    layers = json.loads(paths["json"].read_text())["layers"]
    assert len(layers) == 6 and all(r["lasso_step2"]["mean"] < r["lasso_start"]["mean"] for r in layers)


def test_checkpoint_of_the_other_family_is_explained(tmp_path):
    pth = tmp_path / "crate_alpha_mini.pth"
    released_alpha_pth(pth)
    with pytest.raises(ValueError, match=r"holds CRATE-α weights.*mini_patch4_28 is a CRATE;.*crate_alpha"):
        load_model(pth, "crate_mini_patch4_28")
    crate_pth = tmp_path / "crate_mini.pth"
    torch.save(timm.create_model("crate_mini_patch4_28").state_dict(), crate_pth)
    with pytest.raises(ValueError, match=r"holds CRATE weights.*is a CRATE-α.*name a crate_\* model"):
        load_model(crate_pth, "crate_alpha_mini_patch4_28")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@BOTH_FAMILIES
def test_audit_runs_on_a_cuda_model(family):
    """The audit keeps every tensor on the model's device (it once built identity matrices on the CPU)."""
    torch.manual_seed(0)
    name = family.mini
    model = timm.create_model(name).eval()
    images = torch.randn(4, 1, 28, 28)
    on_cpu = analysis.audit(model, images)
    on_gpu = analysis.audit(model.cuda(), images.cuda())
    for cpu_row, gpu_row in zip(on_cpu, on_gpu, strict=True):
        assert cpu_row.keys() == gpu_row.keys()
        for key in ("orthonormality_gap", "head_coherence", "eta_lipschitz"):
            assert gpu_row[key] == pytest.approx(cpu_row[key], rel=1e-9), (name, key)
        for key in ("compression_in", "lasso_start"):
            assert gpu_row[key]["mean"] == pytest.approx(cpu_row[key]["mean"], rel=1e-4), (name, key)
