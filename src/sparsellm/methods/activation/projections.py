"""The runtime's compute units: one fused projection with its skipping rule, and the MLP.

Split from `sparsellm.methods.activation.runtime` (which walks the model, keeps the KV cache and
generates) because these are the pieces that decide, per call, which weight columns are
read: a `Proj` holds a weight in both layouts and a `Rule` read from the wrappers of
`sparsellm.methods.activation.modules`; `GatedMLP` adds CATS' gate threshold and CoreInfer's fixed
per-prompt sub-MLP. Tokens one per row go through the column kernels (or the native
extension's fused call), several at once through masked matmuls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsellm.methods.activation.coreinfer import CoreActivation, core_neurons
from sparsellm.methods.activation.kernels import (
    ColumnMajor,
    dense_matvec,
    gather_matvec,
    select_channels,
)
from sparsellm.methods.activation.modules import ActSparseLinear, keep_channels


@dataclass
class Rule:
    """When to skip an input channel of one fused projection (see ActSparseLinear)."""

    threshold: float
    scale: torch.Tensor | None = None
    lr_a: torch.Tensor | None = None  # (out, r) fused over the group's projections
    lr_b: torch.Tensor | None = None  # (r, in)

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        return keep_channels(x, self.threshold, self.scale)


@dataclass
class Proj:
    """One fused projection: the weight in both layouts and its skipping rule."""

    weight: torch.Tensor  # (out, in), shared with the model (no copy)
    bias: torch.Tensor | None
    cm: ColumnMajor
    rule: Rule | None
    native: Any = None  # the compiled sparse_gemv extension, when available
    torch_dense: bool = False  # dense calls use F.linear (faster for this shape, measured)
    kept: int = 0
    seen: int = 0

    @classmethod
    def dense(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Proj:
        """A projection with no skipping rule (copies `weight` into the kernel layout)."""
        return cls(weight, bias, ColumnMajor.from_weight(weight, bias), None)

    @classmethod
    def fuse(cls, modules: list[nn.Module]) -> Proj:
        bases = [m.base_layer if isinstance(m, ActSparseLinear) else m for m in modules]
        w = torch.cat([b.weight.detach() for b in bases]) if len(bases) > 1 else bases[0].weight
        w = w.detach()
        biases = [b.bias for b in bases]
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        rule = None
        first = modules[0]
        if isinstance(first, ActSparseLinear) and float(first.threshold) > 0:
            lr_a = lr_b = None
            if first.lr_b.numel():
                lr_a = torch.cat([m.lr_a for m in modules])
                lr_b = first.lr_b
            scale = first.col_norm if first.col_norm.numel() else None
            rule = Rule(float(first.threshold), scale, lr_a, lr_b)
        return cls(w, bias, ColumnMajor.from_weight(w, bias), rule)

    def __call__(self, x: torch.Tensor, sparse: bool) -> torch.Tensor:
        """x is (tokens, in). One token per row: the kernel; several: batched matmuls."""
        rule = self.rule if sparse else None
        if rule is None and self.torch_dense:
            return F.linear(x, self.weight, self.bias)
        if self.native is not None and x.shape[0] <= 8:
            return self._native(x, rule)
        keep = None if rule is None else rule.keep(x)
        if x.shape[0] > 8:  # prompt / verification pass: compute-bound, masked matmul
            y = F.linear(x if keep is None else x * keep, self.weight, self.bias)
        elif keep is None:
            y = dense_matvec(x, self.cm)
        else:
            idx, xz = select_channels(x, keep)
            # weight reads, counted from the kernel's own indices (no extra op)
            self.kept += idx.numel() * self.cm.out_features
            self.seen += x.numel() * self.cm.out_features
            y = gather_matvec(xz.gather(1, idx), self.cm, idx)
        if keep is not None and rule.lr_b is not None:
            y = y + F.linear(F.linear(x * ~keep, rule.lr_b), rule.lr_a)
        return y

    def _native(self, x: torch.Tensor, rule: Rule | None) -> torch.Tensor:
        """One fused call: threshold, select, skip columns (see kernels.native_kernel)."""
        cm, none = self.cm, EMPTY
        wt = cm.table.view(cm.in_features, cm.out_features)
        bias = none if self.bias is None else self.bias
        if rule is None:
            return self.native.sparse_gemv(x, wt, none, -1.0, bias)[0]
        scale = none if rule.scale is None else rule.scale
        y, kept = self.native.sparse_gemv(x, wt, scale, rule.threshold, bias)
        self.kept += kept * cm.out_features
        self.seen += x.numel() * cm.out_features
        if rule.lr_b is not None:
            y = y + F.linear(F.linear(x * ~rule.keep(x), rule.lr_b), rule.lr_a)
        return y


EMPTY = torch.empty(0)  # "no tensor" for the native calls


def pick_dense_kernels(projs: list[Proj], rounds: int = 3) -> None:
    """Per weight shape, time our column kernel (native, or the pure-torch one without a
    compiler) against `F.linear` for one dense token
    and let the faster one serve dense calls (our dense baseline is the best of both).

    Measured, not assumed: the column kernel wins on the default model's narrow
    matrices, MKL's GEMV on Qwen2.5-0.5B's wide ones and on LM heads. Each round streams
    every matrix of the shape once, as decode does, so caches do not flatter either side.
    """
    by_shape: dict[tuple[int, ...], list[Proj]] = {}
    for proj in projs:
        by_shape.setdefault(tuple(proj.weight.shape), []).append(proj)
    for shape, group in by_shape.items():
        x = torch.randn(1, shape[1])
        best = {True: float("inf"), False: float("inf")}
        for _ in range(rounds):
            for use_torch in (False, True):
                for proj in group:
                    proj.torch_dense = use_torch
                t = time.perf_counter()
                for proj in group:
                    proj(x, sparse=False)
                best[use_torch] = min(best[use_torch], time.perf_counter() - t)
        for proj in group:
            proj.torch_dense = best[True] < best[False]


@dataclass
class GatedMLP:
    """SwiGLU MLP; with a CATS threshold the up rows / down columns of cut gates are skipped."""

    gate: Proj
    up_weight: torch.Tensor  # (inter, hidden) natural layout: rows are gathered
    up_bias: torch.Tensor | None
    down: Proj
    act: nn.Module
    gate_threshold: float  # 0 = no CATS
    core: CoreActivation | None = None  # CoreInfer: a fixed sub-MLP per prompt
    core_mlp: tuple[Proj, Proj] | None = None
    kept: int = 0
    seen: int = 0

    def _core_call(self, x: torch.Tensor) -> torch.Tensor:
        """CoreInfer: the prompt runs dense and picks the core; later tokens use only it."""
        inter = self.up_weight.shape[0]
        if self.core_mlp is not None:
            gu = self.core_mlp[0](x, False)
            k = gu.shape[1] // 2
            self.kept += x.shape[0] * k * 3 * x.shape[1]  # gate, up and down weights
            self.seen += x.shape[0] * inter * 3 * x.shape[1]
            return self.core_mlp[1](self.act(gu[:, :k]) * gu[:, k:], False)
        gu = self.gate(x, False)
        h = self.act(gu[:, :inter]) * gu[:, inter:]
        core = core_neurons(h.abs(), self.core.token_keep, self.core.sparsity)
        w_gu = self.gate.weight
        idx = core.nonzero().view(-1)
        rows = torch.cat([idx, idx + inter])
        bias = None if self.gate.bias is None else self.gate.bias[rows]
        self.core_mlp = (
            Proj.dense(w_gu[rows], bias),
            Proj.dense(self.down.weight[:, idx].contiguous(), self.down.bias),
        )
        for proj in self.core_mlp:
            proj.native = self.gate.native
        return self.down(h, False)

    def __call__(self, x: torch.Tensor, sparse: bool) -> torch.Tensor:
        if sparse and self.core is not None:
            return self._core_call(x)
        if self.gate_threshold <= 0:
            gu = self.gate(x, sparse)  # fused gate|up
            inter = self.up_weight.shape[0]
            return self.down(self.act(gu[:, :inter]) * gu[:, inter:], sparse)
        a = self.act(self.gate(x, sparse))
        if not sparse:
            return self.down(a * F.linear(x, self.up_weight, self.up_bias), False)
        keep = a.abs() > self.gate_threshold
        if x.shape[0] > 1:
            h = (a * keep) * F.linear(x, self.up_weight, self.up_bias)
            return self.down(h, sparse)
        idx = keep[0].nonzero().view(-1)
        per_channel = 2 * x.shape[1]  # a row of up and a column of down
        self.kept += idx.numel() * per_channel
        self.seen += keep.numel() * per_channel
        u = F.linear(x, self.up_weight.index_select(0, idx))
        if self.up_bias is not None:
            u = u + self.up_bias[idx]
        h = a[:, idx] * u
        return gather_matvec(h, self.down.cm, idx.view(1, -1))
