"""SPDF (Thangarasa, Gupta, Marshall, et al., 2023): sparse pre-training, dense fine-tuning.

Pre-training runs with static unstructured sparsity: every block linear keeps a random
`1 − sparsity` fraction of its weights (the same fraction in every layer; embeddings,
norms and the LM head stay dense), chosen at initialisation and never changed, so the
linears cost `1 − sparsity` of the dense FLOPs. Fine-tuning then drops the masks: every
weight trains, the pruned ones starting from zero, so the model regains dense capacity
for the downstream data at fine-tuning's small cost. The claim tested: the sparse
pre-training saves FLOPs at little loss after dense fine-tuning.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsellm.errors import SparseLLMError
from sparsellm.pretrain.train import Masks, linear_weights


def random_masks(model: nn.Module, sparsity: float, seed: int = 0) -> Masks:
    """Static masks keeping exactly round((1 − sparsity)·n) random weights of each block
    linear (n its size); the weights are zeroed at once."""
    if not 0.0 <= sparsity < 1.0:
        raise SparseLLMError(f"sparsity must be in [0, 1), not {sparsity}")
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for name, w in linear_weights(model).items():
        keep = torch.zeros(w.numel(), dtype=torch.bool)
        keep[torch.randperm(w.numel(), generator=gen)[: round((1 - sparsity) * w.numel())]] = True
        masks[name] = (w, keep.view_as(w))
    out = Masks(masks)
    out.apply()
    return out


def train_flops(linear_params: float, tokens: int) -> float:
    """Training FLOPs of the block linears: 6 per (kept) weight per token (forward 2,
    backward 4), the count both papers use; attention scores and embeddings left out."""
    return 6.0 * linear_params * tokens
