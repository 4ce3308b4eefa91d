"""How far CRATE-MAE's decoder layer is from inverting its encoder layer: an empirical measurement,
not a theorem (docs/crate-mae.md). The decoder runs the encoder backwards, its layer L−1−ℓ mirroring
encoder layer ℓ; for the stream z_ℓ entering encoder layer ℓ this measures, per layer,

    ‖dec_{L−1−ℓ}(enc_ℓ(z_ℓ)) − z_ℓ‖_F / ‖z_ℓ‖_F

(Frobenius norms over the whole batch). The round trip is exact only in special constructions
(verification/test_mae.py builds one); with random or trained weights it is not.

    python -m verification.mae_roundtrip   # a random released-scale model in float64
"""

import argparse
from collections.abc import Callable, Sequence

import torch

from crate.models.mae import CRATEMAE, Masking
from reference.official_mae import OfficialCRATEMAE, random_masking, random_official_mae_state_dict

Layer = Callable[[torch.Tensor], torch.Tensor]


def round_trip_errors(encoder: Sequence[Layer], decoder: Sequence[Layer], x: torch.Tensor) -> torch.Tensor:
    """(depth,) float64: the relative round-trip error of each encoder layer ℓ with decoder layer
    depth−1−ℓ, z_0 = x (B, N, d), z_{ℓ+1} = enc_ℓ(z_ℓ)."""
    if len(encoder) != len(decoder):
        raise ValueError(f"{len(encoder)} encoder layers but {len(decoder)} decoder layers")
    errors, z = [], x
    for layer, mirror in zip(encoder, reversed(decoder), strict=True):
        encoded = layer(z)
        errors.append(torch.linalg.vector_norm(mirror(encoded) - z) / torch.linalg.vector_norm(z))
        z = encoded
    return torch.stack(errors).double()


def reference_round_trip_errors(model: OfficialCRATEMAE, x: torch.Tensor) -> torch.Tensor:
    """``round_trip_errors`` of the float64 released model on the stream x (B, N, d)."""
    with torch.no_grad():
        return round_trip_errors(
            [lambda z, block=block: block.states(z).output for block in model.blocks],
            [lambda z, block=block: block.states(z).output for block in model.decoder_blocks],
            x,
        )


def fast_round_trip_errors(
    model: CRATEMAE, images: torch.Tensor, masking: Masking | None = None
) -> torch.Tensor:
    """``round_trip_errors`` of a fast CRATEMAE on its embedding of ``images`` (every patch, or the
    masked patches replaced by the mask token), in the model's precision; pass a model in eval mode
    (dropout and drop path would perturb the layers)."""
    with torch.no_grad():
        return round_trip_errors(list(model.blocks), list(model.decoder_blocks), model.embed(images, masking))


def random_reference_errors(seed: int, mask_ratio: float) -> torch.Tensor:
    """The measurement for a random released-scale model of crate_mae_mini_patch4_28's sizes."""
    generator = torch.Generator().manual_seed(seed)
    sizes = dict(dim=128, depth=4, heads=4, head_dim=32, patch_size=4, channels=1, num_patches=49)
    model = OfficialCRATEMAE.from_state_dict(
        random_official_mae_state_dict(**sizes, generator=generator), heads=sizes["heads"]
    )
    images = torch.randn(8, 1, 28, 28, generator=generator, dtype=torch.float64)
    masking = random_masking(torch.rand(8, 49, generator=generator, dtype=torch.float64), mask_ratio)
    return reference_round_trip_errors(model, model.encoder_input(images, masking))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    args = parser.parse_args()
    errors = random_reference_errors(args.seed, args.mask_ratio)
    print("random released-scale CRATE-MAE (mini sizes, float64): ‖dec(enc(z)) − z‖/‖z‖ per layer")
    for layer, error in enumerate(errors.tolist()):
        print(f"  encoder layer {layer} / decoder layer {len(errors) - 1 - layer}: {error:.4f}")


if __name__ == "__main__":
    main()
