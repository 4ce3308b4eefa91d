"""CRATE: white-box transformers via sparse rate reduction (Yu et al., NeurIPS 2023).

The fast model (``crate.model``), registered with timm on import when timm is installed; the float64
reference it is verified against is the sibling package ``reference``.
"""

import importlib.util

from .model import (
    CRATE,
    VARIANTS,
    CRATEConfig,
    LayerStates,
    convert_official_state_dict,
    load_official_state_dict,
    variant_config,
)

if importlib.util.find_spec("timm") is not None:
    from . import registry  # noqa: F401  (registers the models with timm)

__version__ = "0.1.0"
__all__ = [
    "CRATE",
    "VARIANTS",
    "CRATEConfig",
    "LayerStates",
    "convert_official_state_dict",
    "load_official_state_dict",
    "variant_config",
]
