"""ProSparse (Song, Han, Zhang, et al., 2024): ReLU-fication with progressive sparsity
regularisation, for high intrinsic activation sparsity.

A SwiGLU model's gate activation (SiLU) is almost never exactly zero, so activation
sparsity must be imposed at inference (TEAL, CATS) at some cost in quality. ProSparse
instead changes the model: (1) the gate activation becomes ReLU, so every negative
pre-activation is an exact zero; (2) continued training adds an L1 penalty on the
activation outputs whose factor λ rises smoothly in stages — within stage i from
λ_{i-1} to λ_i along a quarter sine, so the model is never shocked by a jump — pushing
more of them to zero. A zero gate output means the matching up-projection row and
down-projection column are never needed, which is what CATS-style kernels skip.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from sparsellm.errors import SparseLLMError
from sparsellm.methods.activation.modules import replace_module
from sparsellm.models.adapters import block_layout, get_blocks


def relufy(model: nn.Module) -> int:
    """Replace every block's gate activation with ReLU and record it in the config (so a
    saved checkpoint reloads as the ReLU model it is); returns how many were replaced."""
    path = block_layout(model).gate_act
    blocks = get_blocks(model)
    for block in blocks:
        replace_module(block, path, nn.ReLU())
    for key in ("hidden_act", "hidden_activation"):  # Llama/Qwen name it one way, Gemma the other
        if getattr(model.config, key, None) is not None:
            setattr(model.config, key, "relu")
    return len(blocks)


def progressive_lambda(progress: float, stages: Sequence[float]) -> float:
    """λ at `progress` ∈ [0, 1] of training: equal stages, stage i rising from
    ``stages[i-1]`` (0 before the first) to ``stages[i]`` along sin(π/2 · t), t the
    fraction of the stage done; the last value holds at the end."""
    if not stages or any(s < 0 for s in stages):
        raise SparseLLMError("ProSparse needs at least one non-negative lambda stage")
    p = min(max(progress, 0.0), 1.0) * len(stages)
    i = min(int(p), len(stages) - 1)
    start = stages[i - 1] if i else 0.0
    return start + (stages[i] - start) * math.sin(math.pi / 2 * min(p - i, 1.0))


class ActivationL1:
    """Forward hooks on every block's gate activation: `penalty()` is the mean |a| over
    the activations produced since the last call (averaged over layers), the L1 term
    ProSparse adds to the loss; `zero_fraction()` the share of exact zeros seen, the
    sparsity a CATS-style kernel could skip. A context manager: hooks go on exit."""

    def __init__(self, model: nn.Module) -> None:
        path = block_layout(model).gate_act
        self.acts = [block.get_submodule(path) for block in get_blocks(model)]
        self._terms: list[torch.Tensor] = []
        self.zeros = 0
        self.count = 0
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if torch.is_grad_enabled():
            self._terms.append(output.abs().float().mean())
        self.zeros += int((output == 0).sum())
        self.count += output.numel()

    def __enter__(self) -> ActivationL1:
        self._handles = [act.register_forward_hook(self._hook) for act in self.acts]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def penalty(self) -> torch.Tensor:
        """Mean |activation| of the forwards since the last call (0 if none)."""
        terms, self._terms = self._terms, []
        return torch.stack(terms).mean() if terms else torch.zeros(())

    def zero_fraction(self) -> float:
        """Exact zeros over all activations seen since `reset`."""
        return self.zeros / max(self.count, 1)

    def reset(self) -> None:
        self.zeros, self.count, self._terms = 0, 0, []
