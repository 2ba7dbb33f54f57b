"""Mask math shared by every weight pruner (pure functions, no model).

Convention: a mask is a bool tensor shaped like the weight where **True means pruned**
(set to zero). Patterns:

* ``unstructured`` — a fraction `sparsity` of the scored elements is pruned, either
  over the whole matrix (``per="layer"``) or separately in every output row
  (``per="row"``, Wanda's comparison group).
* ``N:M`` — in every group of M consecutive weights along the input dimension of each
  row, exactly N (the lowest-scoring) are pruned, so 2:4 and 4:8 are 50% sparse. Groups
  run along the reduction dimension, which is what sparse tensor-core hardware uses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from sparsellm.errors import SparseLLMError


@dataclass(frozen=True)
class Pattern:
    """A parsed sparsity pattern: unstructured (n = m = 0) or N:M."""

    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> float | None:
        """The sparsity an N:M pattern implies (None for unstructured)."""
        return self.n / self.m if self.is_nm else None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"


def parse_pattern(text: str) -> Pattern:
    """``"unstructured"`` or ``"N:M"`` with 1 <= N < M."""
    if text == "unstructured":
        return Pattern()
    match = re.fullmatch(r"(\d+):(\d+)", text.strip())
    if not match:
        raise SparseLLMError(f"pattern {text!r} is neither 'unstructured' nor 'N:M' (e.g. 2:4)")
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m:
        raise SparseLLMError(f"pattern {text!r}: N:M needs 1 <= N < M (N zeros of every M)")
    return Pattern(n, m)


def check_sparsity(sparsity: float) -> float:
    """Validate a sparsity fraction in [0, 1)."""
    if not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise SparseLLMError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return float(sparsity)


def check_nm_shape(pattern: Pattern, in_features: int, name: str = "layer") -> None:
    """N:M groups must tile the input dimension exactly."""
    if pattern.is_nm and in_features % pattern.m:
        raise SparseLLMError(
            f"{name}: pattern {pattern} needs M={pattern.m} to divide the input dimension "
            f"{in_features}"
        )


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the `k` lowest entries along the last dimension (ties broken by topk)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(scores, k, dim=-1, largest=False).indices
        mask.scatter_(-1, idx, True)
    return mask


def unstructured_mask(scores: torch.Tensor, sparsity: float, per: str = "layer") -> torch.Tensor:
    """Prune exactly ``int(sparsity * count)`` lowest scores per matrix or per row."""
    if per == "row":
        return lowest_k_mask(scores, int(scores.shape[-1] * sparsity))
    if per == "layer":
        flat = scores.reshape(-1)
        return lowest_k_mask(flat, int(flat.numel() * sparsity)).view_as(scores)
    raise ValueError(f"per must be 'row' or 'layer', got {per!r}")


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the `n` lowest of every `m` consecutive scores along the last dim (vectorised)."""
    rows, cols = scores.shape
    grouped = scores.reshape(rows, cols // m, m)
    return lowest_k_mask(grouped, n).reshape(rows, cols)


def make_mask(
    scores: torch.Tensor, sparsity: float, pattern: Pattern, per: str = "layer"
) -> torch.Tensor:
    """Dispatch to the N:M or unstructured mask for `pattern`."""
    if pattern.is_nm:
        return nm_mask(scores, pattern.n, pattern.m)
    return unstructured_mask(scores, sparsity, per)
