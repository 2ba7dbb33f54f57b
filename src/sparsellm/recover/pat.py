"""PAT (Liu, Yang, Chen, et al., 2025): pruning-aware tuning that learns which hidden channels
to delete while it fine-tunes.

Hybrid Sparsification Modules (HSMs) sit wherever the residual stream is written: after the
embedding, after every attention output projection and after every MLP down projection.
Each computes ``y = s ⊙ m ⊙ (x + B·A·x)``: a LoRA-sized Hybrid Identity Operator (A r×d,
Kaiming; B d×r, zero, so it starts as the identity), a per-channel scale s (ones) and the
Unified Sparsification Mask m, one mask of d channels shared by every HSM. Because every
writer of the residual stream is masked by the same m, a channel m zeroes is zero in the
whole residual stream; after tuning the hidden width itself shrinks (`merge_pat`).

The mask is trained through logits μ (zeros): ``m = σ(T·μ) + b`` with the temperature
``T = 1 / (1 − log t / log N)`` rising to ∞ over the N steps and the offset
``b = max(0.5 − t/N, 0)``, so m starts at 1 everywhere and hardens into {0, 1}; after 80%
of training μ is frozen. Its loss drives the count of channels with μ ≥ 0 to the target
(``10·|#(μ ≥ 0) − keep| / keep``, the count differentiated straight-through) and every μ
away from 0 (the means of (μ − ½)² over μ > 0 and of (μ + ½)² over μ ≤ 0). The Identity
Loss, the mean of (AAᵀ − I)², keeps each A orthonormal, so rotation lives in A and B and
scaling in s. Models with tied embeddings get a mask-only embedding HSM (no A, B, s), so the
embedding and the head stay one matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from sparsellm.errors import SparseLLMError
from sparsellm.methods.structured.common import head_dim, set_module, slice_linear
from sparsellm.methods.structured.slicing import sliced_width, width_multiple
from sparsellm.models.adapters import block_layout, get_blocks

FREEZE_AT = 0.8  # share of training after which the mask logits stop moving


def mask_value(mu: torch.Tensor, progress: float, steps: int) -> torch.Tensor:
    """The soft mask ``σ(T·μ) + b`` at `progress` ∈ [0, 1] of `steps` steps (μ and T frozen
    from `FREEZE_AT` on)."""
    if progress >= FREEZE_AT:
        mu, progress = mu.detach(), FREEZE_AT
    t = max(1.0, progress * steps)
    temperature = 1.0 / (1.0 - math.log(t) / math.log(max(steps, 2)) + 1e-6)
    return torch.sigmoid(temperature * mu) + max(0.5 - progress, 0.0)


class _CountSTE(torch.autograd.Function):
    """1[μ ≥ 0] forward, the identity backward (straight-through)."""

    @staticmethod
    def forward(ctx: object, mu: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return (mu >= 0).to(mu.dtype)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


def mask_loss(mu: torch.Tensor, keep: int) -> torch.Tensor:
    """PAT's mask loss: the straight-through count of μ ≥ 0 pulled to `keep`, plus every μ
    pulled to ±½ by its sign."""
    count = _CountSTE.apply(mu).sum()
    loss = 10 * (count - keep).abs() / keep
    pos, neg = mu[mu > 0], mu[mu <= 0]
    if pos.numel():
        loss = loss + (pos - 0.5).square().mean()
    if neg.numel():
        loss = loss + (neg + 0.5).square().mean()
    return loss


def identity_loss(a: torch.Tensor) -> torch.Tensor:
    """Mean of (AAᵀ − I)²: zero exactly when the rows of A are orthonormal."""
    return (a @ a.T - torch.eye(a.shape[0], dtype=a.dtype)).square().mean()


class UnifiedMask(nn.Module):
    """The one channel mask every HSM applies; holds the schedule's progress."""

    def __init__(self, width: int, keep: int, steps: int, speed: float = 1.0) -> None:
        super().__init__()
        self.mu = nn.Parameter(torch.zeros(width))
        self.keep, self.steps, self.speed, self.progress = keep, steps, speed, 0.0
        self.hard = False  # after merging decisions: exactly the kept channels

    def logits(self) -> torch.Tensor:
        """μ times `speed`: under Adam a parameter moves about lr per step whatever its
        scale, so `speed` lets the mask harden within a short CPU budget."""
        return self.mu * self.speed

    def kept(self) -> torch.Tensor:
        """Sorted indices of the `keep` channels with the largest μ."""
        return self.mu.detach().topk(self.keep).indices.sort().values

    def forward(self) -> torch.Tensor:
        if self.hard:
            return torch.zeros_like(self.mu).index_fill(0, self.kept(), 1.0)
        return mask_value(self.logits(), self.progress, self.steps)


class HSM(nn.Module):
    """A Hybrid Sparsification Module around a residual writer (Linear or Embedding)."""

    def __init__(
        self, base: nn.Module, mask: UnifiedMask, rank: int, transform: bool = True
    ) -> None:
        super().__init__()
        self.base, self.mask = base, [mask]  # a list: the mask is registered once, above
        self.a = self.b = self.scale = None
        if transform:
            d = mask.mu.shape[0]
            self.a = nn.Parameter(torch.empty(rank, d))
            nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
            self.b = nn.Parameter(torch.zeros(d, rank))
            self.scale = nn.Parameter(torch.ones(d))

    def operator(self) -> torch.Tensor:
        """The d×d map ``diag(s·m)(I + BA)`` this module applies to its base's output."""
        m = self.mask[0]()
        if self.a is None:
            return torch.diag(m)
        eye = torch.eye(m.shape[0], dtype=self.a.dtype)
        return (self.scale * m)[:, None] * (eye + self.b @ self.a)

    def forward(self, *args: torch.Tensor, **kwargs: object) -> torch.Tensor:
        x = self.base(*args, **kwargs)
        m = self.mask[0]().to(x.dtype)
        if self.a is None:
            return x * m
        y = x + (x @ self.a.T.to(x.dtype)) @ self.b.T.to(x.dtype)
        return y * (self.scale.to(x.dtype) * m)


def add_pat(
    model: nn.Module,
    fraction: float = 0.125,
    steps: int = 200,
    rank: int = 16,
    speed: float = 1.0,
) -> UnifiedMask:
    """Insert HSMs after the embedding and every o/down projection, sharing one mask that
    will keep ``(1 − fraction)`` of the hidden channels (rounded to a width HF configs
    accept); `steps` is the nominal training length of the mask schedule, `speed` scales the
    mask logits (`UnifiedMask.logits`). Freezes nothing:
    freeze the base first (`sparsellm.recover.lora.add_lora` does)."""
    if not 0.0 < fraction < 1.0:
        raise SparseLLMError(f"PAT's fraction must be in (0, 1), not {fraction}")
    layout = block_layout(model)
    d = model.config.hidden_size
    keep = sliced_width(d, fraction, width_multiple(model.config))
    if keep >= d:
        raise SparseLLMError(f"fraction {fraction} of width {d} removes no channel")
    mask = UnifiedMask(d, keep, steps, speed)
    model.pat_mask = mask
    emb = model.get_submodule(layout.embed)
    tied = model.get_output_embeddings().weight is emb.weight
    set_module(model, layout.embed, HSM(emb, mask, rank, transform=not tied))
    for block in get_blocks(model):
        for name in (layout.o, layout.down):
            set_module(block, name, HSM(block.get_submodule(name), mask, rank))
    return mask


def hsms(model: nn.Module) -> list[HSM]:
    """Every HSM `add_pat` inserted (embedding first, then block by block)."""
    return [m for m in model.modules() if isinstance(m, HSM)]


def pat_regularizer(
    model: nn.Module, identity_weight: float = 1.0
) -> Callable[[float], torch.Tensor]:
    """``regularizer(progress)`` for `sparsellm.recover.distill.distill`: advances the mask
    schedule (the next forward uses it) and returns the mask plus identity losses."""
    mask: UnifiedMask = model.pat_mask

    def regularizer(progress: float) -> torch.Tensor:
        mask.progress = progress
        loss = mask_loss(mask.logits(), mask.keep)
        for h in hsms(model):
            if h.a is not None:
                loss = loss + identity_weight * identity_loss(h.a)
        return loss

    return regularizer


@torch.no_grad()
def merge_pat(model: nn.Module) -> int:
    """Fold every HSM into its writer with the hard mask (the `keep` largest μ), then delete
    the masked channels everywhere: embedding columns, writer rows, reader columns, norm
    weights (scaled by √(d/d') with ε·d/d', so each RMSNorm is what it was over d) and head
    columns. Returns the new width d'; ``config.hidden_size`` follows."""
    mask: UnifiedMask = model.pat_mask
    mask.hard = True
    layout = block_layout(model)
    cfg = model.config
    d, idx = mask.mu.shape[0], mask.kept()
    keep = idx.numel()
    cfg.head_dim = head_dim(cfg)
    emb_hsm = model.get_submodule(layout.embed)
    emb = emb_hsm.base
    tied = model.get_output_embeddings().weight is emb.weight
    if not tied:
        emb.weight.copy_(emb.weight @ emb_hsm.operator().T)
    emb.weight = nn.Parameter(emb.weight[:, idx].contiguous())
    emb.embedding_dim = keep
    set_module(model, layout.embed, emb)
    scale, eps = math.sqrt(d / keep), d / keep
    for block in get_blocks(model):
        for name in (layout.o, layout.down):
            h = block.get_submodule(name)
            op = h.operator()
            h.base.weight.copy_(op @ h.base.weight)
            if h.base.bias is not None:
                h.base.bias.copy_(op @ h.base.bias)
            set_module(block, name, slice_linear(h.base, idx, None))
        for name in (layout.q, layout.k, layout.v, layout.gate, layout.up):
            set_module(block, name, slice_linear(block.get_submodule(name), None, idx))
    for norm in [
        *(
            b.get_submodule(n)
            for b in get_blocks(model)
            for n in (layout.attn_norm, layout.mlp_norm)
        ),
        model.get_submodule(layout.final_norm),
    ]:
        norm.weight = nn.Parameter(norm.weight[idx] * scale)
        norm.variance_epsilon *= eps
    head = model.get_output_embeddings()
    if tied:
        head.weight = emb.weight
    else:
        model.set_output_embeddings(slice_linear(head, None, idx))
    cfg.rms_norm_eps *= eps
    cfg.hidden_size = keep
    del model.pat_mask
    return keep
