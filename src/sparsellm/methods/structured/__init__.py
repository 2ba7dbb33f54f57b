"""Structured pruning: smaller dense models (fewer heads, channels, residual dims, blocks).

``apply_structured(model, config, calib_ids)`` removes about ``config.ratio`` of the
transformer blocks' parameters in place and leaves a model whose config matches its
weights (per-layer widths, SliceGPT and low-rank models: see `io.py`, loaded with
`structured.load`). Each method is one module with its config and its registered handler:
`width` (taylor, activation, obs, spectral), `slicing` (slicegpt), `lowrank` (welore,
welore-sparse), `depth` (depth, depth-ppl); ``sparsellm.registry.names("structured")``
lists them and ``sparsellm.config.from_spec("obs:ratio=0.25")`` builds a config by name.
"""

from __future__ import annotations

from sparsellm.methods.structured.base import StructuredConfig, apply_structured
from sparsellm.methods.structured.io import load

__all__ = ["StructuredConfig", "apply_structured", "load"]
