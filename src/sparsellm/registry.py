"""Method name -> (config class, method class). Explicit imports, one line per method."""

from __future__ import annotations

from sparsellm.errors import SparseLLMError
from sparsellm.weights.admm import ADMM, ADMMConfig, ADMMUpdate
from sparsellm.weights.base import WeightPruneConfig, WeightPruner
from sparsellm.weights.dsnot import DSnoT, DSnoTConfig
from sparsellm.weights.gblm import GBLM, GBLMConfig
from sparsellm.weights.magnitude import Magnitude, MagnitudeConfig
from sparsellm.weights.sparsegpt import SparseGPT, SparseGPTConfig
from sparsellm.weights.wanda import Wanda, WandaConfig

METHODS: dict[str, tuple[type[WeightPruneConfig], type[WeightPruner]]] = {
    "magnitude": (MagnitudeConfig, Magnitude),
    "wanda": (WandaConfig, Wanda),
    "sparsegpt": (SparseGPTConfig, SparseGPT),
    "dsnot": (DSnoTConfig, DSnoT),
    "gblm": (GBLMConfig, GBLM),
    "admm": (ADMMConfig, ADMM),
    "admm_update": (ADMMConfig, ADMMUpdate),
}


def lookup(method: str) -> tuple[type[WeightPruneConfig], type[WeightPruner]]:
    """Config and method classes for `method`, or an error listing the valid names."""
    if method not in METHODS:
        raise SparseLLMError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    return METHODS[method]
