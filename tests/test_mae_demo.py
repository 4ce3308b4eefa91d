"""The CRATE-MAE demo (crate.mae_demo) and its audit (crate.analysis.mae_audit, write_mae_report): the
numbers come from the model's own states, known constructions give the known answers, the files are
written, and the demo runs end to end and reuses its stages."""

import json

import pytest
import torch
import torch.nn.functional as F

import reference
from crate import analysis, mae_demo
from crate.models.mae import CRATEMAE, CRATEMAEConfig

TINY = dict(img_size=(8, 8), in_chans=1, patch_size=2, dim=16, depth=2, heads=2)  # 16 patches of 2×2


def tiny_mae(seed: int = 0, steps: int = 0) -> CRATEMAE:
    """A tiny autoencoder, trained by ``steps`` AdamW steps on fixed random images (0: as initialised)."""
    torch.manual_seed(seed)
    model = CRATEMAE(CRATEMAEConfig(**TINY))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    images = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    for _ in range(steps):
        loss, _, _ = model(images)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def masking_of(model: CRATEMAE, images: torch.Tensor, seed: int = 1):
    noise = torch.rand(len(images), model.num_patches, generator=torch.Generator().manual_seed(seed))
    return model.random_masking(images, 0.75, noise)


def images_of(count: int = 4, seed: int = 2) -> torch.Tensor:
    return torch.randn(count, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_reconstruct_pastes_the_visible_patches_exactly_and_the_prediction_where_masked():
    model, images = tiny_mae(steps=3), images_of()
    masking = masking_of(model, images)
    with torch.no_grad():
        pred = model.forward_decoder(model.encode(model.embed(images, masking)))
    patches = model.patchify(model.reconstruct(images, pred, masking.mask))
    visible = masking.mask == 0
    assert torch.equal(patches[visible], model.patchify(images)[visible])
    assert torch.equal(patches[~visible], pred[~visible])
    assert visible.sum(1).tolist() == [4] * len(images)  # ⌊16 · 0.25⌋ kept per image


def test_mae_audit_rows_are_the_compression_of_the_models_own_states():
    """Each row recomputed from layer_states: the encoder's around MSSA through LN₁, the decoder's
    around its expansion through LN₂, both with the layer's own U, and the ISTA outputs' sparsity."""
    model, images = tiny_mae(steps=3), images_of()
    masking = masking_of(model, images)
    result = analysis.mae_audit(model, images, masking)
    with torch.no_grad():  # the audit's states: in eval mode MSSA takes SDPA, in training another kernel
        encoder, decoder = model.eval().layer_states(images, masking)
    assert len(result["encoder"]) == len(result["decoder"]) == TINY["depth"]

    def rate(x, norm, block):
        y = F.layer_norm(
            x.double(), norm.normalized_shape, norm.weight.double(), norm.bias.double(), norm.eps
        )
        return reference.compression_rate(y, analysis.subspaces(block), analysis.EPS, normalize=True)

    for row, state, block in zip(result["encoder"], encoder, model.blocks, strict=True):
        assert row["compression_in"]["mean"] == pytest.approx(
            rate(state.input, block.norm1, block).mean().item()
        )
        assert row["compression_out"]["mean"] == pytest.approx(
            rate(state.mssa, block.norm1, block).mean().item()
        )
        assert row["nonzero"]["mean"] == pytest.approx((state.ista != 0).double().mean().item())
    mirrors = reversed(model.blocks)  # decoder layer ℓ undoes encoder layer L − 1 − ℓ
    for row, state, block, mirror in zip(
        result["decoder"], decoder, model.decoder_blocks, mirrors, strict=True
    ):
        before, after = rate(state.mssa, block.norm2, block), rate(state.ista, block.norm2, block)
        assert row["compression_in"]["mean"] == pytest.approx(before.mean().item())
        assert row["compression_out"]["mean"] == pytest.approx(after.mean().item())
        assert row["compression_change"]["mean"] == pytest.approx((after - before).mean().item())
        mirrored = rate(state.ista, block.norm2, mirror)
        assert row["mirror_compression_out"]["mean"] == pytest.approx(mirrored.mean().item())


def test_a_layer_whose_attention_outputs_nothing_leaves_compression_unchanged():
    """Known construction: MSSA's output projection zero, so Z^{ℓ+½} = Z^ℓ in the encoder and
    Z' = u in the decoder: R^c before and after each step are the same numbers (change exactly 0);
    and λ so large that ISTA's threshold exceeds every input: its outputs are all zero."""
    model, images = tiny_mae(steps=3), images_of()
    with torch.no_grad():
        for block in [*model.blocks, *model.decoder_blocks]:
            block.attn.proj.weight.zero_()
            block.attn.proj.bias.zero_()
    for block in model.blocks:
        block.ista.lam = 1e6
    result = analysis.mae_audit(model, images, masking_of(model, images))
    for row in result["encoder"] + result["decoder"]:
        assert row["compression_change"]["mean"] == 0.0
        assert row["compression_in"] == row["compression_out"]
    assert [row["nonzero"]["mean"] for row in result["encoder"]] == [0.0] * TINY["depth"]
    assert all("nonzero" not in row for row in result["decoder"])


def test_write_mae_report_writes_the_table_the_plots_and_the_reconstruction_figure(tmp_path):
    model, images = tiny_mae(steps=3), images_of(count=6)
    paths = analysis.write_mae_report(model, images, tmp_path, title="tiny", seed=3, figure_images=4)
    assert set(paths) == {"json", "markdown", "layers", "reconstructions"}
    for kind in ("layers", "reconstructions"):
        assert paths[kind].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[kind].stat().st_size > 10_000
    saved = json.loads(paths["json"].read_text())
    noise = torch.rand(6, model.num_patches, generator=torch.Generator().manual_seed(3))
    recomputed = analysis.mae_audit(model, images, model.random_masking(images, None, noise))
    assert saved["encoder"] == recomputed["encoder"] and saved["decoder"] == recomputed["decoder"]
    assert saved["images"] == 6 and saved["mask_ratio"] == 12 / 16
    table = paths["markdown"].read_text()
    assert table.count("| encoder (") == table.count("| decoder (") == TINY["depth"]
    assert "lowered R^c in" in table


def test_encoder_features_are_the_cls_and_mean_patch_tokens():
    model, images = tiny_mae(), images_of()
    with torch.no_grad():
        tokens = model.forward_features(images).double()
    features = mae_demo.encoder_features(model, images)
    assert features.shape == (4, 2 * TINY["dim"])
    # two float32 passes of one forward may reduce in different orders: float32 rounding apart at most
    torch.testing.assert_close(
        features, torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], 1), rtol=1e-6, atol=1e-6
    )


def test_ridge_probe_fits_separable_features_and_is_at_chance_on_noise():
    """Features that carry the class (one-hot plus small noise) are classified perfectly; features
    independent of the labels give about 10% (bounded well below what any signal would give)."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (2000,), generator=generator)
    signal = F.one_hot(labels, 10).double() + 0.1 * torch.randn(
        2000, 10, generator=generator, dtype=torch.float64
    )
    probe = mae_demo.ridge_probe(signal[:1500], labels[:1500], signal[1500:], labels[1500:])
    assert probe["top1"] == 100.0 and probe["ridge"] in mae_demo.RIDGES
    assert probe["train_images"] == 1500 and probe["test_images"] == 500 and probe["features"] == 10
    noise = torch.randn(2000, 10, generator=generator, dtype=torch.float64)
    chance = mae_demo.ridge_probe(noise[:1500], labels[:1500], noise[1500:], labels[1500:])
    assert chance["top1"] < 20  # 500 test images at p = 0.1: 20% is 7 standard deviations above


@pytest.mark.slow
def test_demo_runs_every_stage_writes_its_outputs_and_reuses_them(tmp_path, capsys):
    options = [
        "--output",
        str(tmp_path),
        "--pretrain-epochs",
        "1",
        "--pretrain-subset",
        "256",
        "--budget-images",
        "256",
    ]
    options += ["--probe-images", "300", "--eval-subset", "256", "--audit-images", "12"]
    summary = mae_demo.main(options)
    output = capsys.readouterr().out
    assert "Estimated training time on this machine" in output
    for folder, names in (
        ("audit", ("audit.json", "audit.md", "layers.png", "reconstructions.png")),
        ("audit-init", ("audit.json", "audit.md")),
        (".", ("summary.json", "probe.json")),
    ):
        for name in names:
            assert (tmp_path / folder / name).is_file(), name
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert set(saved["stages"]) == {"pretrain", "finetune", "encoder_scratch", "supervised"}
    assert saved["stages"]["finetune"]["model"] == "crate_mae_encoder_mini_patch4_28"
    assert saved["stages"]["supervised"]["model"] == mae_demo.SUPERVISED
    assert {probe["test_images"] for probe in saved["probe"].values()} == {256}
    assert "| fine-tuned from the MAE |" in output

    mae_demo.main(options)
    assert capsys.readouterr().out.count("holds a completed run with this configuration") == 4
