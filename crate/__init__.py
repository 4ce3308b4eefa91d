"""CRATE: white-box transformers via sparse rate reduction (Yu et al., NeurIPS 2023).

The fast model, its training pipeline and the white-box measurements live here; the float64
reference they are verified against is the sibling package ``reference``.
"""

__version__ = "0.1.0"
