"""SliceGPT (Ashkboos et al. 2024): rotate the residual stream by PCA, then delete dimensions.

Computational invariance: with RMSNorm weights folded into the linears that read the
normalised signal, the norm is plain x/rms(x), which commutes with any orthogonal Q.
So each residual signal may be expressed in its own basis without changing the function:
readers W·Q (columns), writers Qᵀ·W (rows), and wherever the residual passes from one
basis to the next a change of basis (a "shortcut" matrix). Choosing each basis as the
principal directions of its signal on calibration data and keeping the top d' puts most
of the signal in few dimensions; everything then shrinks to width d'.

As in the paper, a pre-norm block has two bases: Q_a for its input (read by attention)
and Q_m for the residual after attention (written by o_proj, read by the MLP); down_proj
writes straight into the next block's Q_a. The shortcuts are Q_aᵀQ_m and Q_mᵀQ_a' (both
d'×d'), held by `SlicedBlock`. The bases are found sequentially: each PCA is of the signal
computed by the *already sliced* earlier layers (uncentred second moment XᵀX, float64), so
later bases absorb the errors of earlier slicing.

* After slicing, an RMSNorm would average over d' instead of d dimensions; the norms keep
  a constant weight sqrt(d/d'), so x/rms(x) is what it was over d (the dropped components
  are the small ones).
* Tied embeddings are untied: the embedding is rotated by the first Q_a, the head by the
  last basis. By default the last block writes the full width d (the paper's default,
  `slice_head=False`): the final norm and head stay d wide, only the block internals shrink.
* `config.hidden_size` becomes d' (with an explicit `head_dim`); the saved directory
  needs `sparsellm.load` (vanilla transformers has no shortcut matrices).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from sparsellm.calib.sequential import capture_block_inputs
from sparsellm.methods.structured.base import StructuredConfig
from sparsellm.methods.structured.common import head_dim, set_module
from sparsellm.models.adapters import BlockLayout, block_layout, get_blocks
from sparsellm.registry import register


@dataclass(frozen=True)
class SliceGPTConfig(StructuredConfig):
    """`ratio` of the blocks' parameters, counting the two d'×d' shortcuts per block."""

    name: ClassVar[str] = "slicegpt"
    plain_blocks: ClassVar[bool] = False


class SlicedBlock(nn.Module):
    """A pre-norm block whose two residual adds change basis:

        h = x·S_a + attn(norm₁(x)),   y = h·S_m + mlp(norm₂(h)).

    The HF block's own forward adds residuals in place with no hook point between the
    two branches, so this wrapper composes the block's submodules (named by the
    `BlockLayout`) instead; keyword arguments (rotary embeddings, mask, cache) go to the
    attention unchanged. PEFT-style: `base_layer` holds the weights, `unwrap()` returns
    it, and the shortcuts are parameters (saved, loaded and fine-tuned like any weight).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        layout: BlockLayout,
        attn_shortcut: torch.Tensor,
        mlp_shortcut: torch.Tensor,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layout = layout
        self.attn_shortcut = nn.Parameter(attn_shortcut)
        self.mlp_shortcut = nn.Parameter(mlp_shortcut)

    def __getattr__(self, name: str) -> Any:
        # Models read attributes such as `attention_type` off their blocks.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_layer"), name)

    def attend(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """h = x·S_a + attn(norm₁(x)): the residual stream between the two branches."""
        b, lay = self.base_layer, self.layout
        a = b.get_submodule(lay.attn)(hidden_states=b.get_submodule(lay.attn_norm)(x), **kwargs)
        return x @ self.attn_shortcut + a[0]

    def feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        """y = h·S_m + mlp(norm₂(h)): the block's output."""
        b, lay = self.base_layer, self.layout
        return h @ self.mlp_shortcut + b.get_submodule(lay.mlp)(b.get_submodule(lay.mlp_norm)(h))

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise TypeError("SlicedBlock takes its extra inputs as keywords (llama-style blocks)")
        return self.feed_forward(self.attend(hidden_states, **kwargs))

    def unwrap(self) -> nn.Module:
        return self.base_layer


def pca_basis(h: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of the (uncentred) second moment H = Σ xxᵀ, by decreasing eigenvalue."""
    vals, vecs = torch.linalg.eigh(h.double())
    return vecs[:, vals.argsort(descending=True)]


def second_moment(xs: list[torch.Tensor]) -> torch.Tensor:
    """Σ xxᵀ over every token of every batch, in float64 (the PCA's input)."""
    d = xs[0].shape[-1]
    h = torch.zeros(d, d, dtype=torch.float64)
    for x in xs:
        x = x.reshape(-1, d).double()
        h += x.T @ x
    return h


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


def resize_norm(norm: nn.Module, width: int, dense_width: int) -> None:
    """A folded RMSNorm over `width` dims that scales like the dense one over `dense_width`."""
    scale = math.sqrt(dense_width / width)
    norm.weight = nn.Parameter(torch.full((width,), scale, dtype=norm.weight.dtype))


def width_for_ratio(per_dim: int, d: int, ratio: float, multiple: int = 1) -> int:
    """d' (a multiple of `multiple`) whose sliced block, per_dim·d' linear params + two d'²
    shortcuts + 2d' norm weights, is closest to (1 − ratio) of the dense per_dim·d + 2d."""
    dims = torch.arange(multiple, d + 1, multiple, dtype=torch.float64)
    sliced = per_dim * dims + 2 * dims.square() + 2 * dims
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


def _rotate_block(block: nn.Module, names: tuple[str, ...], q: torch.Tensor, side: str) -> None:
    for name in names:
        set_module(block, name, _rotate(block.get_submodule(name), q, side))


@torch.no_grad()
def slice_model(
    model: nn.Module,
    calib_ids: torch.Tensor,
    fraction: float,
    batch_size: int = 4,
    slice_head: bool = False,
) -> int:
    """Rotate and slice `model` in place, keeping d' ≈ (1 − fraction)·d; returns d'.

    d' is rounded to a multiple of lcm(heads, 8) (see `width_multiple`); fraction 0 keeps d
    (the rotation alone, exact). `slice_head=False` keeps the last block's output, the
    final norm and the head at the dense width d.
    """
    layout = block_layout(model)
    cfg = model.config
    d = cfg.hidden_size
    keep = sliced_width(d, fraction, width_multiple(cfg)) if fraction > 0 else d
    out_width = keep if slice_head else d
    cfg.head_dim = head_dim(cfg)
    head = model.get_output_embeddings()
    if cfg.tie_word_embeddings or head.weight is model.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.data.clone())
        cfg.tie_word_embeddings = False
    fold_norms(model, layout)
    dtype = head.weight.dtype
    xs, calls = capture_block_inputs(model, list(calib_ids.split(batch_size)))
    q = pca_basis(second_moment(xs))[:, :keep]
    emb = model.get_submodule(layout.embed)
    emb.weight = nn.Parameter((emb.weight.data.double() @ q).to(emb.weight.dtype))
    emb.embedding_dim = keep
    xs = [(x.double() @ q).to(dtype) for x in xs]
    blocks = get_blocks(model)
    for i, block in enumerate(blocks):
        last = i == len(blocks) - 1
        _rotate_block(block, (layout.q, layout.k, layout.v), q, "in")
        resize_norm(block.get_submodule(layout.attn_norm), keep, d)
        # Shortcut Qᵀ and unrotated o_proj: the residual after attention in the dense basis.
        sliced = SlicedBlock(block, layout, q.T.to(dtype), torch.empty(0))
        hs = [sliced.attend(x, **c.kwargs) for x, c in zip(xs, calls[i], strict=True)]
        q_mlp = pca_basis(second_moment(hs))[:, :keep]
        sliced.attn_shortcut.data = (q.T @ q_mlp).to(dtype)
        _rotate_block(block, (layout.o,), q_mlp, "out")
        _rotate_block(block, (layout.gate, layout.up), q_mlp, "in")
        resize_norm(block.get_submodule(layout.mlp_norm), keep, d)
        hs = [(h.double() @ q_mlp).to(dtype) for h in hs]
        sliced.mlp_shortcut.data = q_mlp.T.to(dtype)
        ys = [sliced.feed_forward(h) for h in hs]
        q = pca_basis(second_moment(ys))[:, : out_width if last else keep]
        sliced.mlp_shortcut.data = (q_mlp.T @ q).to(dtype)
        _rotate_block(block, (layout.down,), q, "out")
        xs = [(y.double() @ q).to(dtype) for y in ys]
        blocks[i] = sliced
    resize_norm(model.get_submodule(layout.final_norm), out_width, d)
    model.set_output_embeddings(_rotate(head, q, "in"))
    cfg.hidden_size = keep
    cfg.sparsellm_slicing = {
        "hidden_size": keep,
        "dense_hidden_size": d,
        "head_width": out_width,
        "fraction": fraction,
    }
    return keep


@register(SliceGPTConfig)
def shrink_slicegpt(
    model: nn.Module, config: SliceGPTConfig, calib_ids: torch.Tensor | None, batch_size: int
) -> dict[str, Any]:
    """SliceGPT handler: the width d' whose sliced blocks hold about (1 − ratio) of the
    dense blocks' parameters; ratio 0 = the rotation alone (exact)."""
    d = model.config.hidden_size
    per_dim = per_dim_params(get_blocks(model)[0], block_layout(model))
    multiple = width_multiple(model.config)
    keep = width_for_ratio(per_dim, d, config.ratio, multiple) if config.ratio > 0 else d
    slice_model(model, calib_ids, 1 - keep / d, batch_size)
    return {"hidden_size": keep, "slicing_fraction": 1 - keep / d}
