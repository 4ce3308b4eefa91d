"""crate.analysis and `crate audit`: the report's numbers are the reference's functions on the same
activations, the pictures are written, and the measure tells a working MSSA step from a broken one."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import reference
from crate import CRATE, CRATEConfig, analysis
from crate.audit import load_images, load_model
from crate.audit import main as audit_main

SMALL = CRATEConfig(img_size=8, patch_size=2, in_chans=1, num_classes=3, dim=8, depth=2, heads=2)


def _ln(x, norm):
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def test_audit_numbers_are_the_reference_functions_on_the_layer_activations():
    model = CRATE(SMALL).double().eval()
    images = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    layers = analysis.audit(model, images)
    block = model.blocks[1]
    with torch.no_grad():
        x = model.blocks[0](model.embed(images))
        z_half = block.compress(x)
        out = block.sparsify(z_half)
    U = block.attn.qkv.weight.reshape(2, 4, 8).transpose(1, 2)
    D, u = block.ista.weight, _ln(z_half, block.norm2)
    expected = {
        "compression_in": reference.compression_rate(_ln(x, block.norm1), U, 0.1, normalize=True),
        "compression_out": reference.compression_rate(_ln(z_half, block.norm1), U, 0.1, normalize=True),
        "raw_compression_in": reference.compression_rate(_ln(x, block.norm1), U, 0.1),
        "nonzero": (out > 0).double().mean((-2, -1)),
        "lasso_end": reference.lasso_objective(out, u, D, 0.1),
        "lasso_start": 0.5 * ((u.transpose(1, 2) - D @ u.transpose(1, 2)) ** 2).sum((1, 2))
        + 0.1 * u.abs().sum((1, 2)),
    }
    for key, values in expected.items():
        assert layers[1][key]["mean"] == pytest.approx(values.mean().item(), rel=1e-12), key
        assert layers[1][key]["std"] == pytest.approx(values.std().item(), rel=1e-9, abs=1e-12), key
    assert layers[1]["eta_lipschitz"] == pytest.approx(0.1 * torch.linalg.matrix_norm(D, ord=2).item() ** 2)
    gap = max(
        torch.linalg.matrix_norm(U[k].T @ U[k] - torch.eye(4, dtype=torch.float64), ord=2) for k in range(2)
    )
    assert layers[1]["orthonormality_gap"] == pytest.approx(gap.item())


def test_orthonormal_disjoint_heads_have_no_gap_and_no_coherence():
    Q = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64)).Q
    U = Q.T.reshape(2, 4, 8).transpose(1, 2)  # two heads spanning orthogonal halves
    assert analysis._orthonormality_gap(U) < 1e-12
    assert analysis._coherence(U) < 1e-12
    assert analysis._coherence(torch.cat([U[:1], U[:1]])) == pytest.approx(1.0)


def test_attention_maps_and_pca_have_the_patch_grid_shape():
    model = CRATE(SMALL).eval()
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
    assert load_images(str(tmp_path), model, 8).shape == (3, 1, 28, 28)
    with pytest.raises(FileNotFoundError, match="no images"):
        load_images(str(tmp_path / "empty"), model, 8)


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
    images = load_images("fashion-mnist", model, 32)
    trained = analysis.audit(model, images)
    lowered = [r["layer"] for r in trained if r["compression_change"]["mean"] < 0]
    assert lowered, "the trained model's MSSA lowers R^c in no layer"
    for layer in lowered:
        broken = copy.deepcopy(model)
        broken.blocks[layer].attn = _MatchedNoise(broken.blocks[layer].attn)
        assert analysis.audit(broken, images)[layer]["compression_change"]["mean"] > 0, layer
