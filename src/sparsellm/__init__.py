"""sparsellm: make causal LMs sparse, evaluate them fairly, save results that load.

Public API: `load_model`, `sparsify`, `evaluate`, `save`, `load` (plus `calibration`
to build calibration windows).
"""

from sparsellm.api import calibration, evaluate, load, load_model, save, sparsify

__version__ = "0.1.0"

__all__ = ["__version__", "calibration", "evaluate", "load", "load_model", "save", "sparsify"]
