"""The runtime's compute units: one fused projection with its skipping rule, and the MLP.

Split from `sparsellm.runtime.decode` (which walks the model, keeps the KV cache and
generates) because these are the pieces that decide, per call, which weight columns are
read: a `Proj` holds a weight in both layouts and a `Rule` read from the wrappers of
`sparsellm.methods.activation.modules`; `GatedMLP` adds CATS' gate threshold and CoreInfer's fixed
per-prompt sub-MLP. Tokens one per row go through the column kernels (or the native
extension's fused call), several at once through masked matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsellm.formats import Packed, choose_kind, pack, unpack
from sparsellm.methods.activation.coreinfer import CoreActivation, core_neurons
from sparsellm.methods.activation.modules import ActSparseLinear, keep_channels
from sparsellm.runtime.kernels import (
    EMPTY,
    ColumnMajor,
    dense_matvec,
    gather_matvec,
    native_weight,
    pick_chunks,
    select_channels,
)

# Rows up to which a call runs on the kernels (one weight pass, each row's own bits: decode
# batches, speculative verification passes); longer inputs are prompts, run as matmuls.
STEP_ROWS = 16


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
    """One fused projection: its packed weight (any format of `sparsellm.formats`) and its
    skipping rule. fp32 projections also keep the model's own (out, in) tensor (shared,
    no copy), which prompts read through matmuls."""

    packed: Packed  # Wᵀ in its storage format
    bias: torch.Tensor | None
    rule: Rule | None
    weight_fp32: torch.Tensor | None = None  # (out, in), shared with the model (no copy)
    native: Any = None  # the compiled runtime extension, when available
    kept: int = 0
    seen: int = 0
    native_w: Any = field(default=None, repr=False)
    cm: ColumnMajor | None = field(default=None, repr=False)  # fp32 without the extension

    def __post_init__(self) -> None:
        if self.packed.kind == "fp32":
            out, inp = self.packed.shape
            c = pick_chunks(out)
            table = self.packed.values.view(inp * c, out // c)
            self.cm = ColumnMajor(table, inp, out, c, self.bias)

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        """The (out, in) fp32 weight: the model's tensor, or dequantized now ("load
        sparse, compute dense": prompts run as matmuls over it, then it is dropped)."""
        if self.weight_fp32 is not None:
            return self.weight_fp32
        if self.native_w is not None:
            return self.native.dequantize(self.native_w).t()
        return unpack(self.packed)

    def bind(self, native: Any, tiles: bool = True) -> None:
        """Use the compiled extension (or None for pure torch).

        Without a skipping rule every decode call keeps every channel, so (with `tiles`,
        where the VNNI kernels are in use) int8 kinds and int4 get tiles (see
        `native_weight`) and give up the row layout: RAM then holds one copy, and `packed`
        keeps only the scales. `tiles=False` keeps the rows for a caller that skips
        channels anyway."""
        self.native = native
        if native is None:
            self.native_w = None
            return
        self.native_w = native_weight(native, self.packed, tiles=tiles and self.rule is None)
        if self.native_w.extra_bytes:
            self.native_w.release_rows()
            self.packed = replace(
                self.packed, values=self.packed.values[:0], mask=None, offsets=None
            )

    @property
    def tiled(self) -> bool:
        """Whether decode reads this weight's VNNI tiles (see `bind`)."""
        return self.native_w is not None and self.native_w.extra_bytes > 0

    @property
    def nbytes(self) -> int:
        """Bytes of the weight this projection keeps, which a decode step reads: its
        packed tensors (once tiled, only the scales are left) and its tiles."""
        return self.packed.nbytes + (self.native_w.extra_bytes if self.tiled else 0)

    @classmethod
    def dense(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Proj:
        """An fp32 projection with no skipping rule (copies `weight` into the kernel layout)."""
        return cls(pack(weight, "fp32"), bias, None, weight)

    @classmethod
    def fuse(
        cls, modules: list[nn.Module], kind: str = "fp32", packed: Packed | None = None
    ) -> Proj:
        """Projections that share an input, concatenated along the output (q|k|v,
        gate|up), packed as `kind` unless `packed` (already fused, from a checkpoint) is
        given; the skipping rule comes from the first module's ActSparseLinear wrapper."""
        bases = [m.base_layer if isinstance(m, ActSparseLinear) else m for m in modules]
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
        if packed is not None:
            return cls(packed, bias, rule)
        w = torch.cat([b.weight.detach() for b in bases]) if len(bases) > 1 else bases[0].weight
        w = w.detach()
        if kind == "fp32":
            return cls(pack(w, "fp32"), bias, rule, w)
        return cls(pack(w, choose_kind(kind, w)), bias, rule)

    def __call__(self, x: torch.Tensor, sparse: bool) -> torch.Tensor:
        """x is (tokens, in). One token per row: the kernel; several: batched matmuls."""
        rule = self.rule if sparse else None
        if self.native is not None and x.shape[0] <= STEP_ROWS:
            return self._native(x, rule)
        keep = None if rule is None else rule.keep(x)
        if x.shape[0] > STEP_ROWS or self.cm is None:
            # prompt / verification pass (compute-bound, masked matmul), or a packed
            # format without the extension (dequantized: correct, slow)
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
        """One fused call: threshold, select, skip rows (see kernels.native_kernel)."""
        none = EMPTY
        bias = none if self.bias is None else self.bias
        if rule is None:
            return self.native.gemv(x, self.native_w, none, -1.0, bias)[0]
        scale = none if rule.scale is None else rule.scale
        y, kept = self.native.gemv(x, self.native_w, scale, rule.threshold, bias)
        self.kept += kept * self.out_features
        self.seen += x.numel() * self.out_features
        if rule.lr_b is not None:
            y = y + F.linear(F.linear(x * ~rule.keep(x), rule.lr_b), rule.lr_a)
        return y


@dataclass
class GatedMLP:
    """SwiGLU MLP; with a CATS threshold the up rows / down columns of cut gates are skipped."""

    gate: Proj
    up_weight: torch.Tensor | None  # (inter, hidden), rows gathered by CATS (fp32 only)
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
        inter = self.gate.out_features // 2
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
            proj.bind(self.gate.native)
        return self.down(h, False)

    def __call__(self, x: torch.Tensor, sparse: bool) -> torch.Tensor:
        if sparse and self.core is not None:
            return self._core_call(x)
        if self.gate_threshold <= 0:
            gu = self.gate(x, sparse)  # fused gate|up
            inter = self.gate.out_features // 2
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
