"""CRATE's patch embedding on flat patches (an image's constant background), where its first LayerNorm is
ill-conditioned: x − mean is exactly 0, and any rounding of the mean is amplified by 1/√eps ≈ 316.
The fast embedding shifts each patch by its first pixel (crate.models.layers.shifted; LayerNorm is
invariant to it), so that a flat patch normalises to exactly 0 eager or compiled."""

import torch

from crate.models.layers import PatchEmbed, shifted
from verification.asserts import max_abs

PATCH, CHANNELS, DIM, SIZE = 7, 1, 16, 28  # Fashion-MNIST's images, the demo's patches


def embedding_and_images(seed: int = 0) -> tuple[PatchEmbed, torch.Tensor]:
    """A trained-like embedding (random affine norms) and two 28×28 images: the top half of each a flat
    background at the normalised level of a black pixel, the rest texture."""
    generator = torch.Generator().manual_seed(seed)
    embed = PatchEmbed((SIZE, SIZE), PATCH, CHANNELS, DIM)
    with torch.no_grad():
        for norm in (embed.norm_in, embed.norm_out):
            norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=generator))
            norm.bias.copy_(0.5 * torch.randn(norm.bias.shape, generator=generator))
    images = torch.randn(2, CHANNELS, SIZE, SIZE, generator=generator)
    images[
        :, :, : SIZE // 2
    ] = -0.8102576  # Fashion-MNIST's black after its normalisation: (0 − 0.2860) / 0.3530
    return embed, images


def test_shift_leaves_the_layer_norm_unchanged_in_float64():
    """Identity (LayerNorm(x − c) = LayerNorm(x) for a per-row constant c); tolerance 1e-12: float64
    rounding of a 16-element norm of order-1 values (u ≈ 1e-16, amplified by at most 1/√eps)."""
    embed, _ = embedding_and_images()
    generator = torch.Generator().manual_seed(1)
    patches = torch.randn(2, 16, PATCH * PATCH, generator=generator, dtype=torch.float64) + 5.0
    norm = embed.norm_in.double()
    assert max_abs(norm(shifted(patches)) - norm(patches)) < 1e-12


def test_flat_patches_normalise_to_exactly_the_bias():
    embed, images = embedding_and_images()
    patches = _patches(images)
    flat = patches.std(-1) == 0
    assert flat.sum() == 16  # the top half of each image: 2 rows of 4 patches, 2 images
    normalised = embed.norm_in(shifted(patches))[flat]
    assert torch.equal(normalised, embed.norm_in.bias.expand_as(normalised))


def test_compiled_embedding_of_flat_patches_is_as_accurate_as_eager():
    """The precision rule's comparison on flat patches, float32: the compiled embedding's error against
    float64 within 2× the eager unshifted LayerNorm's (the plain implementation) plus 4u·(1 + max|ref|);
    unshifted, the compiled one erred 5.3e-4 against eager's 1.1e-7 on Fashion-MNIST (measured)."""
    embed, images = embedding_and_images()
    reference = PatchEmbed((SIZE, SIZE), PATCH, CHANNELS, DIM).double()
    reference.load_state_dict(embed.state_dict())
    with torch.no_grad():
        exact = reference.norm_out(reference.proj(reference.norm_in(_patches(images.double()))))
        compiled = torch.compile(embed)(images).double()
        plain = embed.norm_out(embed.proj(embed.norm_in(_patches(images)))).double()
    u = torch.finfo(torch.float32).eps / 2
    allowance = 2 * max_abs(plain - exact) + 4 * u * (1 + max_abs(exact))
    assert max_abs(compiled - exact) <= allowance, (
        f"compiled {max_abs(compiled - exact):.3g}, plain {max_abs(plain - exact):.3g}"
    )


def _patches(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, n, p1·p2·c), as PatchEmbed flattens them."""
    grid = SIZE // PATCH
    patches = images.reshape(len(images), CHANNELS, grid, PATCH, grid, PATCH).permute(0, 2, 4, 3, 5, 1)
    return patches.reshape(len(images), grid * grid, -1)
