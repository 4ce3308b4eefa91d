"""CRATE: white-box transformers via sparse rate reduction (Yu et al., NeurIPS 2023), and CRATE-α
(Yang et al., NeurIPS 2024).

The fast models (``crate.models``: CRATE and CRATE-α), registered with timm on import when timm is
installed; the float64 reference they are verified against is the sibling package ``reference``.
"""

import importlib.util

from .models import (
    ALPHA_VARIANTS,
    CRATE,
    VARIANTS,
    CRATEAlpha,
    CRATEAlphaConfig,
    CRATEConfig,
    LayerStates,
    alpha_variant_config,
    convert_official_state_dict,
    load_official_state_dict,
    variant_config,
)

if importlib.util.find_spec("timm") is not None:
    from .models import baselines, crate, crate_mae  # noqa: F401  (register the models with timm: modules "crate", "crate_mae", "baselines")
    from .weights.sources import load_run

__version__ = "0.1.0"
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
    "load_run",
    "variant_config",
]
