"""The audit's figures read without the README: no raw markup outside mathtext, a title and axis
labels on every panel that plots numbers, the shaded band named in the legend, a colour bar with its
units on the attention figure, and the attention of the tokens the head reads (the cls token's row
for a cls-pooled model, the rows averaged over every query for a mean-pooled one)."""

import re

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from matplotlib.text import Text

from crate import analysis
from tests.helpers import BOTH_FAMILIES


def _tiny(family, pool: str):
    config = family.config_class(
        img_size=8, patch_size=2, in_chans=1, num_classes=3, dim=8, depth=2, heads=2, pool=pool
    )
    torch.manual_seed(0)
    return family.model_class(config).eval()


def _images(count: int = 3) -> torch.Tensor:
    return torch.randn(count, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _texts(figure) -> list[str]:
    """Every piece of text the figure draws (titles, labels, ticks, legends, colour-bar labels)."""
    figure.canvas.draw()  # mathtext is parsed here: a malformed $...$ raises
    return [text.get_text() for text in figure.findobj(Text) if text.get_text()]


def _raw_markup(texts: list[str]) -> list[str]:
    """The texts with ``^{`` or ``_{`` outside $...$ (matplotlib would print it as it is)."""
    return [text for text in texts if re.search(r"[\^_]\{", re.sub(r"\$[^$]*\$", "", text))]


@BOTH_FAMILIES
def test_layers_figure_has_mathtext_titles_units_and_the_band_in_its_legend(family):
    model = _tiny(family, "cls")
    layers = analysis.audit(model, _images())
    figure = analysis.layers_figure(layers, "tiny", images=3)
    texts = _texts(figure)
    assert _raw_markup(texts) == []
    assert figure.get_suptitle() == "White-box audit per layer: tiny, 3 images"
    band = "shaded: mean ± 1 s.d. over the 3 images"
    for axis in figure.axes:
        assert axis.get_title() and axis.get_xlabel() and axis.get_ylabel()
        legend = [text.get_text() for text in axis.get_legend().get_texts()]
        assert legend[-1] == band and len(legend) == 1 + len(axis.get_lines())
    compression = figure.axes[0]
    assert "nats" in compression.get_ylabel() and "$R^c$" in compression.get_ylabel()
    assert r"$\mathrm{LN}_1(Z^{\ell+1/2})$" in compression.get_legend().get_texts()[1].get_text()
    matplotlib.pyplot.close(figure)


def test_the_band_label_without_a_count():
    assert analysis.band_label(None) == "shaded: mean ± 1 s.d. over the images"


@BOTH_FAMILIES
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_attention_figure_has_a_colour_bar_titles_and_the_readout_in_its_title(family, pool):
    model = _tiny(family, pool)
    figure = analysis.attention_figure(model, _images(2))
    texts = _texts(figure)
    assert _raw_markup(texts) == []
    bars = [axis for axis in figure.axes if axis.get_label() == "<colorbar>"]
    assert len(bars) == 1 and bars[0].get_ylabel() == analysis.ATTENTION_UNITS
    heads = model.blocks[0].attn.heads
    panels = [axis for axis in figure.axes if axis not in bars]
    assert len(panels) == 2 * (heads + 3)
    assert [axis.get_title() for axis in panels[: heads + 3]] == [
        "image",
        *[f"head {k}" for k in range(heads)],
        "head mean",
        "PCA (RGB = PC 1-3)",
    ]
    assert panels[-1].get_xlabel() == "x (px)" and panels[0].get_ylabel() == "image 0: y (px)"
    title = figure.get_suptitle()
    if pool == "cls":
        assert title.startswith("Attention of the cls token (the head's readout)")
    else:
        assert title.startswith("Attention averaged over all query tokens (the head reads their mean)")
    assert title.endswith("layer 1 of 0..1")
    # one colour scale for every overlay, the bar's: from 0 to the largest weight shown
    maps = analysis.attention_maps(model, _images(2))
    assert bars[0].get_ylim() == pytest.approx((0.0, maps.max().item()))
    matplotlib.pyplot.close(figure)


def _attention_by_hand(model, images: torch.Tensor, layer: int) -> torch.Tensor:
    """(B, K, N, N) attention of ``layer``, from the weights: softmax(s·(yU_k)(yU_k)ᵀ), y = LN₁(Z^ℓ)."""
    with torch.no_grad():
        x = model.embed(images)
        for block in model.blocks[:layer]:
            x = block(x)
        block = model.blocks[layer]
        y = block.norm1(x)
        K = block.attn.heads
        U = block.attn.qkv.weight.unflatten(0, (K, -1))  # (K, p, d)
        w = torch.einsum("bnd,kpd->bknp", y, U)
        return (w @ w.transpose(-2, -1) * U.shape[1] ** -0.5).softmax(-1)


@BOTH_FAMILIES
@pytest.mark.parametrize("layer", [0, 1])
def test_attention_maps_are_the_readout_the_model_uses(family, layer):
    images = _images(3)
    for pool in ("cls", "mean"):
        model = _tiny(family, pool)
        attention = _attention_by_hand(model, images, layer)[..., 1:]  # keys: the patches
        expected = attention[:, :, 0] if pool == "cls" else attention.sum(2) / attention.shape[2]
        maps = analysis.attention_maps(model, images, layer=layer)
        assert maps.shape == (3, 2, 4, 4)
        torch.testing.assert_close(maps.flatten(2), expected, rtol=1e-5, atol=1e-7)
    # the two readouts differ: the mean-pooled map is not the cls row
    assert not torch.allclose(attention[:, :, 0], expected)
