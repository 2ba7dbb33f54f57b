"""Reversible wrappers that make an HF model skip small activations (the reference path).

PEFT-style (docs/design.md, patching option 2): each wrapper keeps the original module as
`base_layer`, holds all of its state in buffers, and `unwrap_activations` puts the
originals back. A threshold of 0 means "off": the wrapper then calls the base module
directly, so sparsity 0 gives bit-identical logits.

These wrappers define the *semantics* (what is skipped); they still run dense matmuls
on zeroed inputs. Speed comes from `sparsellm.runtime.decode`, which reads the same
buffers and skips the columns for real.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from sparsellm.methods.activation.deltallm import track_deltas


def keep_channels(
    x: torch.Tensor, threshold: torch.Tensor | float, scale: torch.Tensor | None
) -> torch.Tensor:
    """The skip rule, shared by the wrappers and the runtime: keep channel i when
    |x_i| · scale_i > threshold (an empty or missing scale means 1)."""
    score = x.abs() if scale is None or scale.numel() == 0 else x.abs() * scale
    return score > threshold


class ActSparseLinear(nn.Module):
    """Skip input channel i when score_i = |x_i| · col_norm_i falls below `threshold`.

    TEAL: col_norm = 1. WINA: col_norm = column L2 norms of W (of the fused projections
    that share this input), so a channel is judged by its actual effect on the output.
    R-Sparse: the skipped part is not dropped but passed through a rank-r factorisation
    `lr_a @ lr_b` of W, i.e. y = W x_kept + A (B x_skipped).
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        threshold: float = 0.0,
        col_norm: torch.Tensor | None = None,
        low_rank: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        w = base_layer.weight
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self.register_buffer(
            "col_norm", torch.empty(0) if col_norm is None else col_norm.to(w.dtype).clone()
        )
        a, b = low_rank if low_rank is not None else (torch.empty(0), torch.empty(0))
        self.register_buffer("lr_a", a.to(w.dtype).clone())
        self.register_buffer("lr_b", b.to(w.dtype).clone())
        self.weights_per_channel = w.shape[0]  # one skipped input channel = one column of W
        self.enabled = True
        self.kept = 0  # channel counts seen since the last `reset_counts`, for reports
        self.seen = 0

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped weight, for code that reads `.weight` (e.g. HF's output embeddings)."""
        return self.base_layer.weight

    def keep_mask(self, x: torch.Tensor) -> torch.Tensor:
        return keep_channels(x, self.threshold, self.col_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or float(self.threshold) <= 0.0:
            return self.base_layer(x)
        keep = self.keep_mask(x)
        self.kept += int(keep.sum())
        self.seen += keep.numel()
        x_kept = x * keep
        y = self.base_layer(x_kept)
        if self.lr_b.numel():
            y = y + F.linear(F.linear(x - x_kept, self.lr_b), self.lr_a)
        return y


class ThresholdedActivation(nn.Module):
    """CATS: zero the gate activation a = act(gate(x)) where |a| < threshold.

    In a SwiGLU MLP, down(a ⊙ up(x)) then needs only the rows of `up` and the columns
    of `down` where a survives, which is what the runtime exploits.
    """

    def __init__(
        self, base_layer: nn.Module, threshold: float = 0.0, weights_per_channel: int = 1
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self.weights_per_channel = weights_per_channel  # a row of up + a column of down
        self.enabled = True
        self.kept = 0
        self.seen = 0

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        a = self.base_layer(g)
        if not self.enabled or float(self.threshold) <= 0.0:
            return a
        keep = a.abs() > self.threshold
        self.kept += int(keep.sum())
        self.seen += keep.numel()
        return a * keep


class TemporalDeltaLinear(nn.Module):
    """DeltaLLM: y_t = W x̂_t with x̂ refreshed per channel only where the input moved by
    more than `threshold` (`sparsellm.methods.activation.deltallm.track_deltas`).

    A forward of several tokens starts a new sequence; a forward of one token continues
    the last one (decode after prefill), from the reference kept in `ref` (not a buffer:
    it is per-sequence state, never saved).
    """

    def __init__(self, base_layer: nn.Linear, threshold: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self.weights_per_channel = base_layer.weight.shape[0]
        self.enabled = True
        self.ref: torch.Tensor | None = None
        self.kept = 0
        self.seen = 0

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or float(self.threshold) <= 0.0:
            return self.base_layer(x)
        seq = x.reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() > 2 else x[None]
        ref = self.ref
        if seq.shape[1] > 1 or ref is None or ref.shape[0] != seq.shape[0]:
            ref = None  # a new sequence
        x_hat, read = track_deltas(seq.detach(), float(self.threshold), ref)
        self.ref = x_hat[:, -1].clone()
        self.kept += int(read.sum())
        self.seen += read.numel()
        return self.base_layer(x_hat.view_as(x).to(x.dtype))


WRAPPERS = (ActSparseLinear, ThresholdedActivation, TemporalDeltaLinear)


def wrapped_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, wrapper) for every activation-sparsity wrapper in the model."""
    for name, module in model.named_modules():
        if isinstance(module, WRAPPERS):
            yield name, module


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Set the submodule at dotted `name` (relative to `root`) to `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def unwrap_activations(model: nn.Module) -> nn.Module:
    """Put every original module back; the model is then exactly the dense one again."""
    for name, module in list(wrapped_modules(model)):
        replace_module(model, name, module.base_layer)
    return model


@contextmanager
def activations_dense(model: nn.Module) -> Iterator[None]:
    """Temporarily run the wrapped model densely (Sirius verification, dense baselines)."""
    mods = [m for _, m in wrapped_modules(model)]
    before = [m.enabled for m in mods]
    try:
        for m in mods:
            m.enabled = False
        yield
    finally:
        for m, e in zip(mods, before, strict=True):
            m.enabled = e


def reset_counts(model: nn.Module) -> None:
    for _, m in wrapped_modules(model):
        m.kept = m.seen = 0


def measured_sparsity(model: nn.Module) -> float | None:
    """Fraction of the wrapped weights skipped since the last `reset_counts`.

    Weighted by the weights each channel carries, so it reads as "share of the weight
    reads saved" (None when nothing was seen).
    """
    kept = seen = 0
    for _, m in wrapped_modules(model):
        kept += m.kept * m.weights_per_channel
        seen += m.seen * m.weights_per_channel
    return None if seen == 0 else 1.0 - kept / seen
