"""The fast models: CRATE (model.py), CRATE-α (alpha.py), the layers they share (layers.py, attention.py,
recompute.py), the released checkpoints' layouts (released.py), and their timm entries (crate.py, with
the demo's baseline in baselines.py), which ``import crate`` registers when timm is installed."""

from .alpha import ALPHA_VARIANTS, CRATEAlpha, CRATEAlphaConfig, alpha_variant_config
from .model import CRATE, VARIANTS, CRATEConfig, LayerStates, variant_config
from .released import convert_official_state_dict, load_official_state_dict

__all__ = [
    "ALPHA_VARIANTS",
    "CRATE",
    "VARIANTS",
    "CRATEAlpha",
    "CRATEAlphaConfig",
    "CRATEConfig",
    "LayerStates",
    "alpha_variant_config",
    "convert_official_state_dict",
    "load_official_state_dict",
    "variant_config",
]
