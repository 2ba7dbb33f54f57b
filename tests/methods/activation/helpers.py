"""Configs for the activation tests, built the way a recipe or the CLI builds them."""

from __future__ import annotations

from typing import Any

from sparsellm.config import from_dict
from sparsellm.methods.activation.base import ActivationConfig


def act_config(method: str, **keys: Any) -> ActivationConfig:
    """`method`'s config from `keys` (by registered name); R-Sparse gets rank 4 unless
    given, so its SVDs stay cheap on the tiny models."""
    if method == "rsparse":
        keys.setdefault("rank", 4)
    cfg = from_dict({"method": method, **keys}, family="activation")
    assert isinstance(cfg, ActivationConfig)
    return cfg
