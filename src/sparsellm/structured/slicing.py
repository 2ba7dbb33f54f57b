"""SliceGPT (Ashkboos et al. 2024): rotate the residual stream by PCA, then delete dimensions.

Computational invariance: with RMSNorm weights folded into the linears that read the
normalised signal, the norm is plain x/rms(x), which commutes with any orthogonal Q.
So the residual stream may be expressed in a per-block basis Q_i without changing the
function: embeddings E·Q_0, readers W·Q_i (columns), writers Q_iᵀ·W (rows), and between
block i and i+1 a change of basis Q_iᵀQ_{i+1} (a "shortcut" matrix). Choosing Q_i as
the principal directions of block i's input on calibration data and keeping only the top
d' puts most of the signal in few dimensions; everything then shrinks to width d'.

Choices here, simpler than the paper and said so:
* one basis per block, the PCA of its input and output signals together, used for both
  branches; the paper uses one PCA per branch input and writes each branch straight into
  the next basis. The block's output is rotated into the next block's basis by a wrapper
  (`SlicedBlock`, a d'×d' matmul, the shortcut).
* PCA of the dense model's signals in one pass, not re-estimated on the sliced model.
* After slicing, rms over d' dimensions differs from rms over d; the norms keep a
  constant weight sqrt(d/d') so the scale matches the rms of the kept components.
* Tied embeddings are untied: the embedding is rotated by Q_0, the head by Q_L.
* `config.hidden_size` becomes d' (with an explicit `head_dim`); the saved directory
  needs `sparsellm.load` (vanilla transformers has no shortcut matrices).
"""

from __future__ import annotations

import math
from itertools import pairwise
from typing import Any

import torch
from torch import nn

from sparsellm.models.adapters import BlockLayout, block_layout, get_blocks
from sparsellm.structured.common import block_io_hooks, head_dim, set_module


class SlicedBlock(nn.Module):
    """A block whose output is moved into the next block's basis: y ↦ y·S (the shortcut).

    PEFT-style: the original block is `base_layer`, `unwrap()` gives it back, and the
    shortcut is a parameter, so it is saved, loaded and fine-tuned like any weight.
    """

    def __init__(self, base_layer: nn.Module, shortcut: torch.Tensor) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.shortcut = nn.Parameter(shortcut)

    def __getattr__(self, name: str) -> Any:
        # Models read attributes such as `attention_type` off their blocks.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_layer"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        if isinstance(out, tuple):
            return (out[0] @ self.shortcut, *out[1:])
        return out @ self.shortcut

    def unwrap(self) -> nn.Module:
        return self.base_layer


def pca_basis(h: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of the (uncentred) second moment H = Σ xxᵀ, by decreasing eigenvalue."""
    _, vecs = torch.linalg.eigh(h.double())
    return vecs.flip(-1)


@torch.no_grad()
def residual_moments(
    model: nn.Module, calib_ids: torch.Tensor, batch_size: int
) -> list[torch.Tensor]:
    """Σ xxᵀ of each block's input, plus the last block's output (the head's input)."""
    blocks = get_blocks(model)
    d = model.config.hidden_size
    moments = [torch.zeros(d, d, dtype=torch.float64) for _ in range(len(blocks) + 1)]
    for ids in calib_ids.split(batch_size):
        with block_io_hooks(model) as records:
            model(input_ids=ids, use_cache=False)
        for i, rec in enumerate(records):
            x = rec[0][0].reshape(-1, d).double()
            moments[i] += x.T @ x
        y = records[-1][0][1].reshape(-1, d).double()
        moments[-1] += y.T @ y
    return moments


def _fold_norm(norm: nn.Module, readers: list[nn.Linear]) -> None:
    """W ← W·diag(γ) for every reader of the norm's output, then γ ← 1."""
    gamma = norm.weight.data.double()
    for lin in readers:
        lin.weight.data.copy_((lin.weight.data.double() * gamma).to(lin.weight.dtype))
    norm.weight.data.fill_(1.0)


def fold_norms(model: nn.Module, layout: BlockLayout) -> None:
    """Fold every RMSNorm weight into the linears that read it (function unchanged)."""
    for block in get_blocks(model):
        attn = [block.get_submodule(n) for n in (layout.q, layout.k, layout.v)]
        _fold_norm(block.get_submodule(layout.attn_norm), attn)
        mlp = [block.get_submodule(n) for n in (layout.gate, layout.up)]
        _fold_norm(block.get_submodule(layout.mlp_norm), mlp)
    _fold_norm(model.get_submodule(layout.final_norm), [model.get_output_embeddings()])


def _rotate(lin: nn.Linear, q: torch.Tensor, side: str) -> nn.Linear:
    """New Linear with input columns W·Q (`side='in'`) or output rows Qᵀ·W (`'out'`)."""
    w = lin.weight.data.double()
    b = lin.bias.data.double() if lin.bias is not None else None
    if side == "in":
        w = w @ q
    else:
        w = q.T @ w
        b = b @ q if b is not None else None
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=lin.weight.dtype)
    new.weight.data.copy_(w)
    if b is not None:
        new.bias.data.copy_(b)
    return new


def _resize_norm(norm: nn.Module, d: int, scale: float) -> None:
    norm.weight = nn.Parameter(torch.full((d,), scale, dtype=norm.weight.dtype))


def width_for_ratio(per_dim: int, d: int, ratio: float, multiple: int = 1) -> int:
    """d' (a multiple of `multiple`) whose sliced block, per_dim·d' linear params + d'²
    shortcut + 2d' norm weights, is closest to (1 − ratio) of the dense per_dim·d + 2d."""
    dims = torch.arange(multiple, d + 1, multiple, dtype=torch.float64)
    sliced = per_dim * dims + dims.square() + 2 * dims
    target = (1 - ratio) * (per_dim * d + 2 * d)
    return int(dims[(sliced - target).abs().argmin()].item())


def width_multiple(config) -> int:
    """HF configs require hidden_size % num_attention_heads == 0; 8 keeps kernels happy."""
    return math.lcm(config.num_attention_heads, 8)


def per_dim_params(block: nn.Module, layout: BlockLayout) -> int:
    """Parameters of a block's linears per residual dimension (each reads or writes it once)."""
    names = (layout.q, layout.k, layout.v, layout.o, layout.gate, layout.up, layout.down)
    return (
        sum(block.get_submodule(n).weight.numel() for n in names)
        // block.get_submodule(layout.q).weight.shape[1]
    )


def sliced_width(d: int, fraction: float, multiple: int = 1) -> int:
    """Dimensions kept when slicing `fraction` of d, rounded to a multiple of `multiple`."""
    return min(d, max(multiple, round((1 - fraction) * d / multiple) * multiple))


@torch.no_grad()
def slice_model(
    model: nn.Module, calib_ids: torch.Tensor, fraction: float, batch_size: int = 4
) -> int:
    """Rotate and slice `model` in place, keeping d' ≈ (1 − fraction)·d; returns d'.

    d' is rounded to a multiple of lcm(heads, 8) (see `width_multiple`); fraction 0 keeps d.
    """
    layout = block_layout(model)
    cfg = model.config
    d = cfg.hidden_size
    keep = sliced_width(d, fraction, width_multiple(cfg)) if fraction > 0 else d
    cfg.head_dim = head_dim(cfg)
    moments = residual_moments(model, calib_ids, batch_size)
    # Block i reads x_i and writes x_{i+1}: its basis must hold both. Massive activations
    # are born inside early MLPs, so a basis from the input alone would slice them away.
    signals = [a + b for a, b in pairwise(moments)] + moments[-1:]
    qs = [pca_basis(m)[:, :keep] for m in signals]
    head = model.get_output_embeddings()
    if cfg.tie_word_embeddings or head.weight is model.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.data.clone())
        cfg.tie_word_embeddings = False
    fold_norms(model, layout)
    scale = math.sqrt(d / keep)
    emb = model.get_submodule(layout.embed)
    emb.weight = nn.Parameter((emb.weight.data.double() @ qs[0]).to(emb.weight.dtype))
    emb.embedding_dim = keep
    blocks = get_blocks(model)
    for i, block in enumerate(blocks):
        q = qs[i]
        for name in (layout.q, layout.k, layout.v, layout.gate, layout.up):
            set_module(block, name, _rotate(block.get_submodule(name), q, "in"))
        for name in (layout.o, layout.down):
            set_module(block, name, _rotate(block.get_submodule(name), q, "out"))
        for name in (layout.attn_norm, layout.mlp_norm):
            _resize_norm(block.get_submodule(name), keep, scale)
        shortcut = (q.T @ qs[i + 1]).to(emb.weight.dtype)
        blocks[i] = SlicedBlock(block, shortcut)
    _resize_norm(model.get_submodule(layout.final_norm), keep, scale)
    model.set_output_embeddings(_rotate(head, qs[-1], "in"))
    cfg.hidden_size = keep
    cfg.sparsellm_slicing = {"hidden_size": keep, "dense_hidden_size": d, "fraction": fraction}
    return keep
