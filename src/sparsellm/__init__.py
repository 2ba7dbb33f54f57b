"""sparsellm: make causal LMs sparse, evaluate them fairly, save results that load.

Public API: `load_model`, `calibration`, `sparsify` (weight, structured and activation
steps of a recipe), `attention` (a recipe's sparse prefill / KV-cache methods as a context
manager), `evaluate`, `save`, `load`, and every method's config class by its name
(``sparsellm.WandaConfig``, ``sparsellm.TEALConfig``, ...; see `sparsellm.registry`).
"""

from typing import Any

from sparsellm.api import attention, calibration, evaluate, load, load_model, save, sparsify

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "attention",
    "calibration",
    "evaluate",
    "load",
    "load_model",
    "save",
    "sparsify",
]


def __getattr__(name: str) -> Any:
    """Method config classes (``WandaConfig``, ``SnapKV``...), found in the registry on
    first use, so importing sparsellm does not import every method module."""
    if name[:1].isupper():
        from sparsellm.registry import config_classes

        for cls in config_classes():
            if cls.__name__ == name:
                return cls
    raise AttributeError(f"module 'sparsellm' has no attribute {name!r}")
