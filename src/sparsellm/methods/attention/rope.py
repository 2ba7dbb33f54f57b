"""Rotary-embedding bookkeeping shared by the methods that compare queries and keys
without their positions (LongHeads re-rotates keys into slots; SeerAttention's gate pools
position-free queries and keys, then rotates its own block-level projections).

Prefill methods see post-RoPE queries and keys; undoing the rotation needs the model's
rotary base, which `rope_theta` reads from its config when the method is bound.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Self

import torch

from sparsellm.errors import SparseLLMError


def rope_angles(positions: torch.Tensor, theta: float, dim: int) -> torch.Tensor:
    """(len(positions), dim) rotary angles in transformers' half-split layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    freqs = positions.double()[:, None] * inv_freq[None, :]
    return torch.cat([freqs, freqs], -1)


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Apply the rotary rotation by `angles` (…, T, D) to `x` (…, T, D); negative angles
    undo it."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * angles.cos().to(x.dtype) + rotated * angles.sin().to(x.dtype)


def unrotate(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Post-RoPE queries or keys ``(…, L, D)`` at positions 0 … L-1 back to position-free."""
    return rotate(x, -rope_angles(torch.arange(x.shape[-2]), theta, x.shape[-1]))


def rope_theta(config: Any, method: str) -> float:
    """The rotary base of the model's full-attention layers (Gemma-3 keeps one per layer
    kind), refused unless it is plain RoPE: scaled variants (linear, YaRN, …) rotate by
    other angles than `rope_angles` computes."""
    params = getattr(config, "rope_parameters", None) or {
        "rope_theta": getattr(config, "rope_theta", None)
    }
    params = params.get("full_attention", params)
    if params.get("rope_type", "default") != "default" or not params.get("rope_theta"):
        raise SparseLLMError(f"{method} undoes plain RoPE; this model's rotary is {params}")
    return float(params["rope_theta"])


class RotaryBound:
    """For a prefill config with a ``theta: float = 0.0`` field: `bind` fills it from the
    model's config (`PrefillConfig.bind`'s hook, which `sparse_attention` and `calibrate`
    call), and `rotary_base` is what the method reads, refused while it is still 0."""

    name: str
    theta: float

    def bind(self, config: Any) -> Self:
        if self.theta:
            return self
        return dataclasses.replace(self, theta=rope_theta(config, self.name))  # type: ignore[type-var]

    def rotary_base(self) -> float:
        if not self.theta:
            raise SparseLLMError(
                f"{self.name} needs the model's rotary base: bind it (sparse_attention does)"
            )
        return self.theta
