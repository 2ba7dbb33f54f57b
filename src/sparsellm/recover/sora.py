"""SoRA (Ding, Lv, Wang, et al., 2023): LoRA whose rank is pruned by a sparse gate.

The delta is B · diag(g) · A with a gate vector g over the `rank` components. After every
optimiser step the gate takes the proximal step of an L1 penalty, soft-thresholding
g ← sign(g) · max(|g| − λ·η, 0) (η the step's learning rate), so components the loss does
not need reach exactly zero and stay there unless their gradient pulls them back; at the
end the adapter's rank is the number of non-zero gate entries. Here the delta is also
masked by the layer's keep-mask (as in `sparsellm.recover.lora`), so a pruned model
stays sparse through training and merging.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsellm.errors import SparseLLMError
from sparsellm.models.adapters import get_blocks
from sparsellm.recover.lora import MaskedLoRALinear, add_lora


def soft_threshold(x: torch.Tensor, t: float) -> torch.Tensor:
    """The proximal operator of t·‖x‖₁: sign(x) · max(|x| − t, 0)."""
    if t < 0:
        raise SparseLLMError(f"a soft threshold must be >= 0, not {t}")
    return torch.sign(x) * (x.abs() - t).clamp_min(0.0)


class SoRALinear(MaskedLoRALinear):
    """Masked LoRA with a gate g (rank,) between A and B; g starts N(0, 1) as in the
    reference implementation (B starts at zero, so the layer still starts as its base)."""

    def __init__(
        self, base_layer: nn.Linear, rank: int = 16, alpha: float = 16.0, seed: int = 0
    ) -> None:
        super().__init__(base_layer, rank, alpha)
        g = torch.Generator().manual_seed(seed)
        self.gate = nn.Parameter(torch.randn(rank, generator=g))

    def delta(self) -> torch.Tensor:
        return ((self.lora_b * self.gate) @ self.lora_a) * self.scale * self.keep


class GateProximal:
    """The L1 proximal step on every SoRA gate; pass as `distill(..., after_step=...)`."""

    def __init__(self, gates: list[nn.Parameter], lam: float) -> None:
        if lam < 0:
            raise SparseLLMError(f"SoRA's lambda must be >= 0, not {lam}")
        self.gates = gates
        self.lam = lam

    @torch.no_grad()
    def __call__(self, lr: float) -> None:
        for g in self.gates:
            g.copy_(soft_threshold(g, self.lam * lr))


def add_sora(
    model: nn.Module, rank: int = 16, alpha: float = 16.0, lam: float = 1.0, seed: int = 0
) -> tuple[list[SoRALinear], GateProximal]:
    """Wrap every block linear in a SoRA adapter; returns them and their proximal step.
    Merge with `sparsellm.recover.lora.merge_lora` (the gated delta folds in exactly)."""
    wrapped = add_lora(
        model,
        adapter=lambda lin: SoRALinear(lin, rank, alpha, seed),
    )
    return wrapped, GateProximal([w.gate for w in wrapped], lam)  # type: ignore[attr-defined]


def active_ranks(model: nn.Module) -> list[int]:
    """Per wrapped layer, the gate entries still non-zero (the adapter's rank after SoRA)."""
    return [
        int((m.gate != 0).sum())
        for block in get_blocks(model)
        for m in block.modules()
        if isinstance(m, SoRALinear)
    ]
