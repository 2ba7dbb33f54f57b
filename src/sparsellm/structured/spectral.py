"""Calibration-free structure scores from the weights' spectra (PruneNet-style idea).

PruneNet (Sengupta et al. 2025) learns a policy that keeps the spectrum of each layer;
we keep the idea without the policy: a structure (MLP channel, GQA group) owns a set of
rows of the block's coupled weights, and its importance is its *leverage* in the
dominant singular subspace, Σ_{k≤r} U_jk² over its rows, where r is the smallest rank
that holds `energy` of the squared spectrum. Structures the top directions rely on are
kept; structures living in the spectral tail go. No data is read.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsellm.models.adapters import BlockLayout
from sparsellm.structured.common import BlockShape


def leverage_scores(rows: torch.Tensor, energy: float = 0.9) -> torch.Tensor:
    """Per-row leverage Σ_{k≤r} U_jk² with r holding `energy` of Σσ² (fp64 SVD)."""
    u, s, _ = torch.linalg.svd(rows.double(), full_matrices=False)
    cum = (s.square().cumsum(0) / s.square().sum().clamp_min(1e-300)).float()
    r = int(torch.searchsorted(cum, torch.tensor([energy])).item()) + 1
    return u[:, :r].square().sum(1)


def spectral_scores(
    block: nn.Module, layout: BlockLayout, shape: BlockShape, hd: int, energy: float = 0.9
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per GQA group, per MLP channel) leverage of the rows each structure owns."""

    def w(name: str) -> torch.Tensor:
        return block.get_submodule(name).weight.data.double()

    g = shape.num_key_value_heads
    h = w(layout.q).shape[1]
    group_rows = torch.cat(
        [
            w(layout.q).reshape(g, -1, h),
            w(layout.k).reshape(g, -1, h),
            w(layout.v).reshape(g, -1, h),
            w(layout.o).T.reshape(g, -1, h),
        ],
        dim=1,
    )
    groups = leverage_scores(group_rows.reshape(-1, h), energy).reshape(g, -1).sum(1)
    channel_rows = torch.cat([w(layout.gate), w(layout.up), w(layout.down).T], dim=1)
    return groups.float(), leverage_scores(channel_rows, energy).float()
