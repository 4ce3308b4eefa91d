"""What the layer-by-layer check needs to know of a model family (CRATE or CRATE-α): how to build the
fast model and the float64 reference from a released-layout state dict, the plain implementation of
the precision rule, and how to read the codes of a layer."""

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

import reference

from ..models import CRATE, CRATEAlpha, CRATEAlphaConfig, CRATEConfig
from ..models.mae import CRATEMAE, CRATEMAEEncoder
from ..models.released import official_layout
from . import plain, plain_alpha


@dataclass(frozen=True)
class Family:
    """How to build each implementation from a released-layout state dict, the plain functions
    (``compress(state, layer, x, heads)``, ``sparsify(state, layer, z, eta, lam)`` -> (output,
    pre-activations), ``head(state, x, pool)``, ``embed``), how to read the codes (the ReLU outputs,
    last = the one whose non-zeros are counted) from the fast and the reference layer, and how the
    backward's ReLU flips are masked: entry-wise where the layer output is the codes (CRATE's ISTA),
    token-wise where it is a dense function of them (CRATE-α's z + a₂D₁ᵀ; tokens are independent in
    the block)."""

    name: str
    model_class: type
    make_config: Callable[..., CRATEConfig]  # (state, heads, patch_size, channels, fused) -> config
    make_reference: Callable[[dict, CRATEConfig], nn.Module]  # (float64 state, the fast config)
    plain: ModuleType
    plain_embed: Callable[[dict, torch.Tensor, int], torch.Tensor]  # (state, images, patch size)
    fast_codes: Callable[[nn.Module, torch.Tensor], list[torch.Tensor]]  # (block, z_half)
    reference_sparsify: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (layer modules, z_half)
    reference_codes: Callable[[nn.Module, torch.Tensor], list[torch.Tensor]]
    token_mask: bool


def _grid(state: dict) -> int:
    return int((state["pos_embedding"].shape[1] - 1) ** 0.5)


def _crate_config(state: dict, heads: int, patch_size: int, channels: int, fused: bool) -> CRATEConfig:
    return CRATEConfig(
        img_size=_grid(state) * patch_size,
        patch_size=patch_size,
        in_chans=channels,
        num_classes=state["mlp_head.1.weight"].shape[0],
        dim=state["cls_token"].shape[-1],
        depth=plain.depth(state),
        heads=heads,
        fused_attn=fused,
    )


def _alpha_config(state: dict, heads: int, patch_size: int, channels: int, fused: bool) -> CRATEAlphaConfig:
    dim, state_channels, state_patch, _ = state["conv1.weight"].shape
    if (state_patch, state_channels) != (patch_size, channels):
        raise ValueError(
            f"conv1.weight has {state_channels} channels and {state_patch}×{state_patch} patches, "
            f"not {channels} and {patch_size}×{patch_size}"
        )
    return CRATEAlphaConfig(
        img_size=_grid(state) * patch_size,
        patch_size=patch_size,
        in_chans=channels,
        num_classes=state["mlp_head.1.weight"].shape[0],
        dim=dim,
        depth=plain_alpha.depth(state),
        heads=heads,
        dictionary_ratio=state["transformer.layers.0.1.fn.D"].shape[-1] // dim,
        fused_attn=fused,
    )


def _crate_reference(state: dict, config: CRATEConfig) -> nn.Module:
    return reference.OfficialCRATE.from_state_dict(
        state,
        heads=config.heads,
        patch_size=config.patch_size,
        channels=config.in_chans,
        eta=config.eta,
        lam=config.lam,
        pool=config.pool,
    )


def _alpha_reference(state: dict, config: CRATEConfig) -> nn.Module:
    return reference.OfficialCRATEAlpha.from_state_dict(
        state, heads=config.heads, eta=config.eta, lam=config.lam, pool=config.pool
    )


CRATE_FAMILY = Family(
    name="crate",
    model_class=CRATE,
    make_config=_crate_config,
    make_reference=_crate_reference,
    plain=plain,
    plain_embed=plain.embed,
    fast_codes=lambda block, z: [block.sparsify(z)],
    reference_sparsify=lambda layer, z: layer[1](z),
    reference_codes=lambda layer, z: [layer[1](z)],
    token_mask=False,
)
ALPHA_FAMILY = Family(
    name="alpha",
    model_class=CRATEAlpha,
    make_config=_alpha_config,
    make_reference=_alpha_reference,
    plain=plain_alpha,
    plain_embed=lambda state, images, patch_size: plain_alpha.embed(state, images),
    fast_codes=lambda block, z: list(block.odl.codes(block.norm2(z))),
    reference_sparsify=lambda layer, z: z + layer[1](z),
    reference_codes=lambda layer, z: list(layer[1].fn.codes(layer[1].norm(z))),
    token_mask=True,
)
FAMILIES = {family.name: family for family in (CRATE_FAMILY, ALPHA_FAMILY)}


def family_of(state: dict) -> Family:
    """The family of a released-layout state dict (CRATE-α's has a Conv2d patch embedding)."""
    layout = official_layout(state)
    if layout is None:
        raise ValueError("not a released-layout state dict (no pos_embedding)")
    return ALPHA_FAMILY if layout == "CRATE-α" else CRATE_FAMILY


def model_family(model: nn.Module) -> Family | None:
    """The family of a fast model (None for a model of neither family, e.g. a timm ViT, and for the
    CRATE-MAE encoder as a classifier: a CRATE with a Conv2d patch embedding, which neither released
    classifier has; its layers are checked as the autoencoder's, mae.py)."""
    if isinstance(model, CRATEMAEEncoder):
        return None
    if isinstance(model, CRATEAlpha):
        return ALPHA_FAMILY
    return CRATE_FAMILY if isinstance(model, CRATE) else None


def has_reference(model: nn.Module) -> bool:
    """Whether the gate can check ``model``: a CRATE or CRATE-α of a family, or a CRATE-MAE (mae.py)."""
    return model_family(model) is not None or isinstance(model, CRATEMAE)
