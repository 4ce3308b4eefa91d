"""Slow, obviously-correct float64 reference for CRATE.

The sparse rate reduction objective and its energies (``objective``), the layer steps derived from
them by autograd (``steps``), the released CRATE, CRATE-α and CRATE-MAE architectures written
literally (``official``, ``official_alpha``, ``official_mae``) and sympy derivations for tiny cases
(``symbolic``, imported on demand: it needs sympy).
"""

from .objective import (
    SparseRateReduction,
    attention_energy,
    coding_rate,
    compression_rate,
    compression_rate_taylor2,
    compression_surrogate,
    kernel_energy,
    lasso_data_term,
    lasso_objective,
    sparse_rate_reduction,
)
from .official import (
    LayerStates,
    OfficialCRATE,
    official_state_dict_shapes,
    patchify,
    random_official_state_dict,
)
from .official_alpha import (
    OfficialCRATEAlpha,
    official_alpha_state_dict_shapes,
    random_official_alpha_state_dict,
)
from .official_mae import (
    OfficialCRATEMAE,
    official_mae_state_dict_shapes,
    random_official_mae_state_dict,
)
from .steps import (
    COMPRESSION_MODES,
    compression_gradient,
    compression_step,
    expansion_step,
    ista_step,
    nonnegative_soft_threshold,
    proximal_gradient_steps,
)

__all__ = [
    "COMPRESSION_MODES",
    "LayerStates",
    "OfficialCRATE",
    "OfficialCRATEAlpha",
    "OfficialCRATEMAE",
    "SparseRateReduction",
    "attention_energy",
    "coding_rate",
    "compression_gradient",
    "compression_rate",
    "compression_rate_taylor2",
    "compression_step",
    "compression_surrogate",
    "expansion_step",
    "ista_step",
    "kernel_energy",
    "lasso_data_term",
    "lasso_objective",
    "nonnegative_soft_threshold",
    "official_alpha_state_dict_shapes",
    "official_mae_state_dict_shapes",
    "official_state_dict_shapes",
    "patchify",
    "proximal_gradient_steps",
    "random_official_alpha_state_dict",
    "random_official_mae_state_dict",
    "random_official_state_dict",
    "sparse_rate_reduction",
]
