"""CoreInfer (Wang et al. 2024): sentence-level "core neurons" fixed after the prompt.

For each prompt token, its token-wise core neurons are the `token_keep` fraction of MLP
neurons with the largest activation. The sentence-wise core is the set of neurons
that are token-wise core most often across the prompt; it keeps (1 - sparsity) of the
neurons. Decode then uses only those neurons for the whole generation: the MLP shrinks
to a fixed, smaller dense MLP per prompt, so the runtime needs no per-token selection.

No calibration: the wrapper (`CoreActivation`) computes the core on the first forward
after `reset_cores` (the prompt, run dense) and applies it to every later forward.
That is why CoreInfer has no method config in `sparsellm.registry`: it is a per-prompt
runtime predictor, not a calibrated step for `sparsify_activations`. Nothing is fitted
or saved, and its quality is only meaningful under the prompt-then-decode protocol of
`split_perplexity` (a plain forward would pick the core from the very tokens it scores).

Deviation, measured: the paper ranks neurons by their (ReLU, so non-negative)
activation. In a SwiGLU MLP we rank by |h| with h = act(gate(x)) · up(x), the input of
the down projection, i.e. what a neuron actually contributes. On the default model
(2 wiki windows, second half scored with the core from the first, dense 14.11) the
signed gate activation gave perplexity 58.2 / 599.9 at 20% / 50% sparsity, |gate
activation| 29.0 / 196.2, and |h| 24.9 / 127.8.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sparsellm.methods.activation.modules import replace_module
from sparsellm.methods.activation.thresholds import check_activation_sparsity
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
    """Wraps the MLP down projection: learns the core from its input h on the prompt,
    then zeroes h outside the core (so gate/up rows and down columns go unused)."""

    def __init__(self, base_layer: nn.Module, sparsity: float, token_keep: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.sparsity = sparsity
        self.token_keep = token_keep
        self.register_buffer("core", torch.empty(0, dtype=torch.bool), persistent=False)
        self.enabled = True

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.sparsity <= 0:
            return self.base_layer(h)
        if self.core.numel() == 0:  # the prompt: run dense, remember its core
            scores = h.detach().reshape(-1, h.shape[-1]).abs()
            self.core = core_neurons(scores, self.token_keep, self.sparsity)
            return self.base_layer(h)
        return self.base_layer(h * self.core)


def apply_coreinfer(model: nn.Module, sparsity: float, token_keep: float = 0.4) -> None:
    """Wrap every block's down projection (reverse with `unwrap_coreinfer`)."""
    check_activation_sparsity(sparsity)
    if not 0 < token_keep <= 1:
        raise ValueError(f"token_keep must be in (0, 1], got {token_keep}")
    name = _down_name(model)
    for block in get_blocks(model):
        down = block.get_submodule(name)
        replace_module(block, name, CoreActivation(down, sparsity, token_keep))


def _down_name(model: nn.Module) -> str:
    return get_layout(model).input_groups[-1][0]


def _wrappers(model: nn.Module) -> list[tuple[nn.Module, str, CoreActivation]]:
    name = _down_name(model)
    out = []
    for block in get_blocks(model):
        down = block.get_submodule(name)
        if isinstance(down, CoreActivation):
            out.append((block, name, down))
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
