"""CoreInfer (Wang et al. 2024): sentence-level "core neurons" fixed after the prompt.

For each prompt token, its token-wise core neurons are the `token_keep` fraction of MLP
neurons with the largest gate activation. The sentence-wise core is the set of neurons
that are token-wise core most often across the prompt; it keeps (1 - sparsity) of the
neurons. Decode then uses only those neurons for the whole generation: the MLP shrinks
to a fixed, smaller dense MLP per prompt, so the runtime needs no per-token selection.

No calibration: the wrapper (`CoreActivation`) computes the core on the first forward
after `reset_cores` (the prompt, run dense) and applies it to every later forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sparsellm.activation.modules import replace_module
from sparsellm.activation.thresholds import check_activation_sparsity
from sparsellm.models.adapters import get_blocks, get_layout


def core_neurons(acts: torch.Tensor, token_keep: float, sparsity: float) -> torch.Tensor:
    """Bool mask (neurons,) of the sentence-wise core for activations (tokens, neurons).

    Ties in the frequency count go to the neuron with the larger summed activation, so
    the core always has exactly round((1 - sparsity) · neurons) members.
    """
    n = acts.shape[1]
    k_tok = max(1, math.ceil(token_keep * n))
    top = acts.topk(k_tok, dim=-1).indices
    counts = torch.zeros(n).index_add_(0, top.reshape(-1), torch.ones(top.numel()))
    total = acts.float().sum(0)
    span = (total.max() - total.min()).clamp_min(1e-12)
    tie_break = 0.5 * (total - total.min()) / span  # in [0, 0.5]: never beats a count
    core = torch.zeros(n, dtype=torch.bool)
    core[(counts + tie_break).topk(round((1.0 - sparsity) * n)).indices] = True
    return core


class CoreActivation(nn.Module):
    """Wraps the MLP gate activation: learns the core on the prompt, then applies it."""

    def __init__(self, base_layer: nn.Module, sparsity: float, token_keep: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.sparsity = sparsity
        self.token_keep = token_keep
        self.register_buffer("core", torch.empty(0, dtype=torch.bool), persistent=False)
        self.enabled = True

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        a = self.base_layer(g)
        if not self.enabled or self.sparsity <= 0:
            return a
        if self.core.numel() == 0:  # the prompt: run dense, remember its core
            self.core = core_neurons(a.reshape(-1, a.shape[-1]), self.token_keep, self.sparsity)
            return a
        return a * self.core


def apply_coreinfer(model: nn.Module, sparsity: float, token_keep: float = 0.4) -> None:
    """Wrap every block's gate activation (reverse with `unwrap_coreinfer`)."""
    check_activation_sparsity(sparsity)
    if not 0 < token_keep <= 1:
        raise ValueError(f"token_keep must be in (0, 1], got {token_keep}")
    layout = get_layout(model)
    for block in get_blocks(model):
        act = block.get_submodule(layout.gate_act)
        replace_module(block, layout.gate_act, CoreActivation(act, sparsity, token_keep))


def _wrappers(model: nn.Module) -> list[tuple[nn.Module, str, CoreActivation]]:
    layout = get_layout(model)
    out = []
    for block in get_blocks(model):
        act = block.get_submodule(layout.gate_act)
        if isinstance(act, CoreActivation):
            out.append((block, layout.gate_act, act))
    return out


def reset_cores(model: nn.Module) -> None:
    """Forget the cores: the next forward is treated as a new prompt."""
    for _, _, act in _wrappers(model):
        act.core = torch.empty(0, dtype=torch.bool)


def unwrap_coreinfer(model: nn.Module) -> None:
    for block, name, act in _wrappers(model):
        replace_module(block, name, act.base_layer)


@torch.no_grad()
def split_perplexity(model: nn.Module, windows: torch.Tensor, prompt_len: int) -> float:
    """Perplexity of each window's tokens after `prompt_len`, the prompt read first.

    The protocol CoreInfer needs: the first `prompt_len` tokens are the "prompt" (dense,
    they set the cores), the rest are scored with the cores fixed, as in decoding. Run it
    on the dense model too for the baseline (same tokens scored).
    """
    nll, count = 0.0, 0
    for ids in windows:
        reset_cores(model)
        ids = ids[None]
        first = model(ids[:, :prompt_len], use_cache=True)
        rest = model(ids[:, prompt_len:], past_key_values=first.past_key_values, use_cache=True)
        logits = torch.cat([first.logits[:, -1:], rest.logits[:, :-1]], dim=1)
        target = ids[:, prompt_len:]
        nll += float(F.cross_entropy(logits[0].float(), target[0], reduction="sum"))
        count += target.numel()
    reset_cores(model)
    return math.exp(nll / count)
