"""A lean CPU decode runtime for llama-style models, any weight format, dense or
activation-sparse.

Long module: one class owns the decode state (packed projections, KV cache, the native
Decoder, kept/seen counters) and every path that touches it (prompt blocks, decode steps,
generation, streaming, weight accounting); split, each piece would reach into the others.

Why a runtime of our own: HF `generate` spends ~15% of a decode step outside the
matmuls and calls `F.linear` per projection, whose M=1 path is slower than the
column-gather kernel even with every column kept on narrow matrices (see `kernels`),
but faster on wide ones. To report a speedup that is about skipping, not about a
better dense kernel, the runtime runs the same code for dense and sparse: fused
projections (q|k|v and gate|up share one input and one channel selection), a static
KV cache, and per projection the column kernel over the columns that pass the layer's
threshold (sparse) or over all of them (dense). Dense calls never use `F.linear`: our
kernel gives a token the same bits whether it runs alone or beside others (a batch, a
speculative verification pass), which is what makes speculative decoding exact, and on
the CPUs measured it was also faster for 1-8 rows.

Decode steps of the common case (SiLU-gated MLP, TEAL/WINA thresholds, batch <= 8) run
as one call into the native extension's `Decoder`, which walks every block in C++ with
the same kernels and choices; the Python blocks below remain the definition and serve
prompts, verification passes, CATS, R-Sparse and CoreInfer. Why: the Python loop costs
~6 ms of ~32 ms per token on the default model outside the projections (norms, RoPE,
cache writes, reshapes, residual adds), paid equally by dense and sparse.

It reads the model: weights through the adapter layout, thresholds / WINA scales /
R-Sparse factors / CATS gate thresholds from the wrappers of
`sparsellm.methods.activation.modules`. The HF model is not modified. Prompt tokens (prefill,
and Sirius' verification passes) run as batched masked matmuls with the same masks as
the wrappers, so runtime and HF reference compute the same function. The per-call units
(`Proj`, `GatedMLP`) are in `sparsellm.runtime.projections`;
this module walks the blocks, keeps the KV cache and generates.

Costs to know: the runtime keeps a transposed copy of every block weight and the LM
head (~the model's size again). Batches must be unpadded (equal prompt lengths).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsellm.errors import SparseLLMError
from sparsellm.formats import Packed, choose_kind, concat, embed_rows
from sparsellm.methods.activation.coreinfer import CoreActivation
from sparsellm.methods.activation.modules import (
    ActSparseLinear,
    TemporalDeltaLinear,
    ThresholdedActivation,
)
from sparsellm.models.adapters import get_blocks, get_layout
from sparsellm.runtime.kernels import native_kernel
from sparsellm.runtime.projections import EMPTY, GatedMLP, Proj


@dataclass
class Norm:
    """RMSNorm as one fused op (HF's module spends six ops per call on it)."""

    weight: torch.Tensor
    eps: float

    @classmethod
    def of(cls, module: nn.Module) -> Norm:
        eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", 1e-6)
        return cls(module.weight.detach(), float(eps))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


@dataclass
class Layer:
    attn_norm: Norm
    mlp_norm: Norm
    qkv: Proj
    o: Proj
    mlp: GatedMLP
    k_cache: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    v_cache: torch.Tensor = field(default_factory=lambda: torch.empty(0))


def _computes(act: nn.Module, ref: Any) -> bool:
    """Whether `act` computes `ref` (SiLU or ReLU: what the Decoder implements). Checked on
    values, since transformers wraps activations in classes that change between versions."""
    probe = torch.linspace(-8, 8, 65)
    with torch.no_grad():
        return torch.allclose(act(probe), ref(probe), rtol=1e-6, atol=1e-7)


def _block(layer: Layer) -> list[Proj]:
    """A block's four projections in the Decoder's order."""
    return [layer.qkv, layer.o, layer.mlp.gate, layer.mlp.down]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin in three ops: rotate_half(x) = roll(x, d/2) with the sign
    of the first half folded into `sin_signed` (see `DecodeRuntime._rope`)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)


class DecodeRuntime:
    """Greedy generation with our kernels; `sparse=False` gives the dense baseline."""

    def __init__(
        self,
        model: nn.Module,
        max_len: int = 2048,
        native: bool = True,
        fmt: str = "fp32",
        packed: dict[str, Packed] | None = None,
        layers: Collection[int] | None = None,
    ) -> None:
        """`fmt` packs the model's block linears and LM head in that format (see
        `sparsellm.formats.choose_kind`); `packed` instead supplies them as stored in a
        compressed checkpoint, by module name. `layers` keeps only those blocks (a
        layer-skipping draft: the others pass the residual stream through)."""
        if any(isinstance(m, TemporalDeltaLinear) for m in model.modules()):
            raise SparseLLMError(
                "deltallm (temporal deltas) runs on the reference path only, not the runtime"
            )
        layout = get_layout(model)
        cfg = model.config
        self.model = model
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.max_len = max_len
        self.embed = model.get_submodule(layout.embed)
        self.final_norm = Norm.of(model.get_submodule(layout.final_norm))
        self.rotary = model.get_submodule(layout.rotary)
        self.fmt = fmt
        self._packed = packed
        self._names = {id(m): n for n, m in model.named_modules()}
        head = model.get_output_embeddings()
        if packed is not None and self._names[id(head)] in packed:
            self.lm_head = Proj.fuse([head], packed=packed[self._names[id(head)]])
        else:
            kind = choose_kind(fmt, head.weight, head=True)
            self.lm_head = Proj.fuse([head], kind=kind)  # sparse with `head`
        # a tied head doubles as the embedding: read its rows instead of a second copy
        self.embed_packed: Packed | None = None
        if head.weight is self.embed.weight and self.lm_head.packed.kind != "fp32":
            self.embed_packed = self.lm_head.packed
        elif packed is not None and self._names[id(self.embed)] in packed:
            self.embed_packed = packed[self._names[id(self.embed)]]
        blocks = get_blocks(model)
        keep = range(len(blocks)) if layers is None else sorted(set(layers))
        self.blocks = list(keep)  # the model's block index of each of self.layers
        self.layers = [self._layer(blocks[i], layout) for i in keep]
        self._names = {}
        self.native = native_kernel() if native else None
        tied = self.embed_packed is not None and self.embed_packed is self.lm_head.packed
        # a ReLU model's down projections skip their exact zeros on sparse steps (see
        # _build_decoder): they keep the row layout, which skips
        relu_down = {id(ly.mlp.down) for ly in self.layers} if self._relu() else set()
        for proj in self._all_projs():
            proj.bind(self.native, tiles=id(proj) not in relu_down)
        # a tied head whose rows went to tiles is the embedding from there (see _embed;
        # kept apart from lm_head, which a draft may swap for a smaller one)
        self._embed_tiles: Any = None
        if tied and self.lm_head.tiled:
            self._embed_tiles = self.lm_head.native_w
            self.embed_packed = self.lm_head.packed
        self._packed = None  # the projections hold what they need (their rows may be freed)
        self.cos, self.sin = self._rope()
        self._decoder: Any = None  # the native whole-step decoder, built by `reset`
        self._counts = torch.zeros(4 * len(self.layers), 2, dtype=torch.int64)

    def fusable(self) -> bool:
        """Whether decode steps can run as one native call (`sparse_gemv.cpp`'s Decoder):
        the extension is built and every block is a SiLU- or ReLU-gated MLP with at most a
        (scaled) threshold per projection; CATS, R-Sparse and CoreInfer use the Python
        path."""
        if self.native is None or not hasattr(self.native, "Decoder"):
            return False
        relu = self._relu()
        for layer in self.layers:
            mlp = layer.mlp
            if mlp.gate_threshold > 0 or mlp.core is not None:
                return False
            if not _computes(mlp.act, F.relu if relu else F.silu):
                return False
            if any(p.rule is not None and p.rule.lr_b is not None for p in _block(layer)):
                return False
        return True

    def _relu(self) -> bool:
        """A ReLU-gated model (ProSparse): exact zeros in the down projection's input."""
        return bool(self.layers) and _computes(self.layers[0].mlp.act, F.relu)

    def _build_decoder(self) -> Any:
        """Hand the block weights and rules to the Decoder. In a ReLU-gated model the down
        projection skips its exact zeros on sparse steps (the smallest positive threshold,
        so nothing else is skipped) unless a rule sets one."""
        relu = self._relu()
        tensors: list[torch.Tensor] = []
        thresholds: list[float] = []
        eps: list[float] = []
        weights: list[Any] = []
        for layer in self.layers:
            tensors += [layer.attn_norm.weight, layer.mlp_norm.weight]
            eps += [layer.attn_norm.eps, layer.mlp_norm.eps]
            for p in _block(layer):
                tensors += [
                    EMPTY if p.bias is None else p.bias.detach(),
                    EMPTY if p.rule is None or p.rule.scale is None else p.rule.scale,
                ]
                weights.append(p.native_w)
                thresholds.append(0.0 if p.rule is None else p.rule.threshold)
            if relu and thresholds[-1] <= 0:
                thresholds[-1] = torch.finfo(torch.float32).tiny
        norm = self.final_norm
        return self.native.Decoder(
            tensors,
            weights,
            thresholds,
            eps,
            self.n_heads,
            self.n_kv,
            self.head_dim,
            norm.weight,
            norm.eps,
            relu,
        )

    def _fold_counts(self) -> None:
        """Move the Decoder's kept / seen channel counts into the projections' counters."""
        counts = self._counts.tolist()
        projs = [p for layer in self.layers for p in _block(layer)]
        for proj, (kept, seen) in zip(projs, counts, strict=True):
            proj.kept += kept * proj.out_features
            proj.seen += seen * proj.out_features
        self._counts.zero_()

    def _layer(self, block: nn.Module, layout: Any) -> Layer:
        qkv_names, o_names, gu_names, down_names = layout.input_groups
        act = block.get_submodule(layout.gate_act)
        gate_thr = float(act.threshold) if isinstance(act, ThresholdedActivation) else 0.0
        base_act = act.base_layer if isinstance(act, ThresholdedActivation) else act
        gate_up = [block.get_submodule(n) for n in gu_names]
        up = gate_up[1].base_layer if isinstance(gate_up[1], ActSparseLinear) else gate_up[1]
        down_mod = block.get_submodule(down_names[0])
        core = down_mod if isinstance(down_mod, CoreActivation) else None
        if (gate_thr > 0 or core is not None) and (self.fmt != "fp32" or self._packed):
            raise SparseLLMError("CATS and CoreInfer run on fp32 weights only (--format hf)")
        down = self._proj([down_mod.base_layer if core is not None else down_mod])
        # CATS: the gate alone runs dense, up rows and down columns are gathered
        gate = self._proj(gate_up[:1] if gate_thr > 0 else gate_up)
        up_bias = None if up.bias is None else up.bias.detach()
        up_w = up.weight.detach() if gate_thr > 0 else None
        mlp = GatedMLP(gate, up_w, up_bias, down, base_act, gate_thr, core)
        return Layer(
            attn_norm=Norm.of(block.get_submodule(layout.attn_norm)),
            mlp_norm=Norm.of(block.get_submodule(layout.mlp_norm)),
            qkv=self._proj([block.get_submodule(n) for n in qkv_names]),
            o=self._proj([block.get_submodule(o_names[0])]),
            mlp=mlp,
        )

    def _proj(self, modules: list[nn.Module]) -> Proj:
        """One fused projection, packed as `fmt` or taken from the checkpoint's packs."""
        if self._packed is None:
            return Proj.fuse(modules, kind=self.fmt)
        bases = [m.base_layer if isinstance(m, ActSparseLinear) else m for m in modules]
        try:
            parts = [self._packed[self._names[id(b)]] for b in bases]
        except KeyError as exc:
            raise SparseLLMError(f"the checkpoint has no packed weight for {exc}") from None
        return Proj.fuse(modules, packed=concat(parts))

    def _rope(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin tables for every position, from the model's own rotary
        module (so any rope scaling it applies is kept), shaped (1, 1, max_len, d)."""
        x = torch.zeros(1, 1, self.head_dim)
        cos, sin = self.rotary(x, torch.arange(self.max_len)[None])
        half = self.head_dim // 2
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        return cos[:, None], sin[:, None]

    def reset(self, batch: int) -> None:
        shape = (batch, self.n_kv, self.max_len, self.head_dim)
        for layer in self.layers:
            layer.k_cache = torch.zeros(shape)
            layer.v_cache = torch.zeros(shape)
        for proj in self.projections():
            proj.kept = proj.seen = 0
        for layer in self.layers:
            layer.mlp.core_mlp = None  # CoreInfer: a new prompt picks a new core
        self._counts.zero_()
        self._bind_caches()

    def _bind_caches(self) -> None:
        # rebuilt per prompt: cheap, and it picks up changed dense-kernel choices
        self._decoder = self._build_decoder() if self.fusable() else None
        if self._decoder is not None:
            self._decoder.set_caches([c for ly in self.layers for c in (ly.k_cache, ly.v_cache)])

    def share_cache(self, other: DecodeRuntime) -> None:
        """Attend over `other`'s KV cache, block by block (this runtime holds the same
        model's blocks or a subset of them, e.g. in another weight format): a self-draft
        then reads the target's exact keys and values for its context, and only its own
        draft tokens' entries, which the target's verification pass rewrites, come from
        its weights (Draft & Verify, LayerSkip). Call after each `other.reset` (a reset
        allocates new tensors); a call while they are already shared does nothing."""
        theirs = dict(zip(other.blocks, other.layers, strict=True))
        if any(b not in theirs for b in self.blocks):
            raise SparseLLMError("share_cache: the other runtime lacks some of these blocks")
        pairs = list(zip(self.layers, [theirs[b] for b in self.blocks], strict=True))
        if all(mine.k_cache is src.k_cache for mine, src in pairs):
            return
        for mine, src in pairs:
            mine.k_cache, mine.v_cache = src.k_cache, src.v_cache
        self._bind_caches()

    def _all_projs(self) -> list[Proj]:
        out = [self.lm_head]
        for layer in self.layers:
            out += _block(layer)
        return out

    def projections(self) -> list[Any]:
        out: list[Any] = [self.lm_head]
        for layer in self.layers:
            out += [*_block(layer), layer.mlp]
        return out

    def _blocks(self, x: torch.Tensor, pos: int, sparse: bool, seq: int = 0) -> torch.Tensor:
        """The blocks in Python: prompts, verification passes, and models the native
        Decoder does not cover. A single sequence (b = 1) may go to cache row `seq`."""
        b, n, _ = x.shape
        rows = slice(seq, seq + b)
        cos, sin = self.cos[:, :, pos : pos + n], self.sin[:, :, pos : pos + n]
        mask = None
        if n > 1:
            mask = torch.ones(n, pos + n, dtype=torch.bool).tril(pos)
        hq, hk, d = self.n_heads, self.n_kv, self.head_dim
        for layer in self.layers:
            h = layer.attn_norm(x).reshape(b * n, -1)
            qkv = layer.qkv(h, sparse).view(b, n, hq + 2 * hk, d).transpose(1, 2)
            qk, v = qkv.split([hq + hk, hk], dim=1)
            q, k = _rotate(qk, cos, sin).split([hq, hk], dim=1)
            layer.k_cache[rows, :, pos : pos + n] = k
            layer.v_cache[rows, :, pos : pos + n] = v
            att = F.scaled_dot_product_attention(
                q,
                layer.k_cache[rows, :, : pos + n],
                layer.v_cache[rows, :, : pos + n],
                attn_mask=mask,
                enable_gqa=hq != hk,
            )
            att = att.transpose(1, 2).reshape(b * n, hq * d)
            x = x + layer.o(att, sparse).view(b, n, -1)
            h = layer.mlp_norm(x).reshape(b * n, -1)
            x = x + layer.mlp(h, sparse).view(b, n, -1)
        return x

    @torch.no_grad()
    def forward(
        self,
        ids: torch.Tensor,
        pos: int,
        sparse: bool,
        last_only: bool = False,
        seq: int = 0,
    ) -> torch.Tensor:
        """Logits (b, L, vocab) for `ids` (b, L) placed at positions pos..pos+L-1 of
        cache rows 0..b-1 (or, for one sequence, of cache row `seq`).

        `last_only` computes the LM head for the last position only (prefill).
        """
        b, n = ids.shape
        if pos + n > self.max_len:
            raise ValueError(f"sequence of {pos + n} tokens exceeds max_len={self.max_len}")
        if n == 1 and b <= 8 and self._decoder is not None:  # a decode step: one native call
            rows = torch.arange(seq, seq + b)
            at = torch.full((b,), pos, dtype=torch.int64)
            return self.step(ids.view(b), rows, at, at, sparse).view(b, 1, -1)
        x = self._embed(ids)
        x = self._blocks(x, pos, sparse, seq)
        if last_only:
            x, n = x[:, -1:], 1
        h = self.final_norm(x).reshape(b * n, -1)
        return self.lm_head(h, sparse).view(b, n, -1)

    @torch.no_grad()
    def step(
        self,
        tokens: torch.Tensor,
        seq: torch.Tensor,
        at: torch.Tensor,
        rope_pos: torch.Tensor,
        sparse: bool,
        visible: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (b, vocab) for one token per row, each at its own place: row r goes to
        cache row seq[r], slot at[r], rotated as position rope_pos[r], and attends to
        slots 0..at[r] or, with `visible` (b, n) bool, to the slots j < n it marks.

        This one call serves a decode step, a batch of requests at different lengths
        (continuous batching) and a speculative verification pass: a chain of draft
        tokens is rows of one sequence at consecutive slots; a tree of them shares slots
        after the prefix, each node seeing its ancestors through `visible` and rotated
        by its depth. Rows go through the blocks together (the weights are read once)
        and each row gets the bits it would get alone.
        """
        if self._decoder is None:
            raise SparseLLMError(
                "batched and speculative decoding need the native Decoder (a C++ compiler; "
                "SiLU-gated models without CATS, R-Sparse or CoreInfer)"
            )
        b = tokens.shape[0]
        limit = self.layers[0].k_cache.shape[0]
        if int(at.max()) >= self.max_len or int(seq.max()) >= limit:
            raise ValueError(f"a row is beyond the cache ({limit} rows of {self.max_len})")
        x = self._embed(tokens.view(1, b))[0]
        cos, sin = self.cos[0, 0, rope_pos], self.sin[0, 0, rope_pos]
        vis = EMPTY if visible is None else visible.to(torch.uint8)
        # the step ends with the final norm applied
        h = self._decoder.step(x.view(b, -1), seq, at, vis, sparse, cos, sin, self._counts)
        return self.lm_head(h, sparse)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of `ids` (b, n): the model's table, the packed head's rows (tied), or
        those rows read from the head's tiles."""
        if self._embed_tiles is not None:
            rows = self.native.tile_rows(self._embed_tiles, ids.reshape(-1))
            return rows.view(*ids.shape, -1)
        if self.embed_packed is None:
            return self.embed(ids)
        return embed_rows(self.embed_packed, ids)

    def move_slots(self, seq: int, src: list[int], dst: int) -> None:
        """Copy cache slots `src` of cache row `seq` to slots dst, dst+1, ... (the accepted
        path of a draft tree, made contiguous; slots of a chain are already in place)."""
        if src == list(range(dst, dst + len(src))):
            return
        idx = torch.tensor(src)
        for layer in self.layers:
            for cache in (layer.k_cache, layer.v_cache):
                cache[seq, :, dst : dst + len(src)] = cache[seq, :, idx]

    @torch.no_grad()
    def generate(
        self, ids: torch.Tensor, new_tokens: int, sparse: bool = True, verify_every: int = 0
    ) -> dict[str, Any]:
        """Greedy decode of `new_tokens` tokens after `ids` (b, P).

        `verify_every=k` (> 0, sparse only) is Sirius-style correction: after every k
        sparse tokens the dense model re-reads them in one pass (rewriting their KV
        entries), and generation resumes from the first token where dense and sparse
        disagree, with the dense token; the prompt is then read densely as well, so with
        k = 1 the output is exactly dense greedy. Returns the tokens, timings and the
        correction rate (rollbacks per verified token).
        """
        b, p = ids.shape
        self.reset(b)
        t0 = time.perf_counter()
        # with verification the prompt is read densely too, so every token is checked
        logits = self.forward(ids, 0, sparse and not verify_every, last_only=True)
        prefill_s = time.perf_counter() - t0
        out = [logits[:, -1].argmax(-1)]
        pos = p
        corrected = verified = 0
        t1 = time.perf_counter()
        draft_start = len(out) - 1  # index in `out` of the first unverified token
        while len(out) < new_tokens:
            logits = self.forward(out[-1][:, None], pos, sparse)
            out.append(logits[:, -1].argmax(-1))
            pos += 1
            if sparse and verify_every and len(out) - 1 - draft_start >= verify_every:
                block = torch.stack(out[draft_start:-1], dim=1)  # tokens already fed
                start = pos - block.shape[1]
                dense = self.forward(block, start, sparse=False).argmax(-1)
                proposed = torch.stack(out[draft_start + 1 :], dim=1)
                same = (dense == proposed).all(0)
                n_ok = int(same.long().cumprod(0).sum())
                verified += proposed.shape[1]
                if n_ok < proposed.shape[1]:
                    corrected += 1
                    out = [*out[: draft_start + 1 + n_ok], dense[:, n_ok]]
                    pos = start + n_ok + 1
                draft_start = len(out) - 1
        decode_s = time.perf_counter() - t1
        tokens = torch.cat([ids, torch.stack(out[:new_tokens], dim=1)], dim=1)
        return {
            "tokens": tokens,
            "prefill_s": prefill_s,
            "decode_s": decode_s,
            "decode_tok_s": (new_tokens - 1) * b / decode_s if decode_s > 0 else float("inf"),
            "corrections": corrected,
            "verified_tokens": verified,
            "correction_rate": corrected / verified if verified else None,  # None: not verified
            "skipped_fraction": self.skipped_fraction(),
        }

    @torch.no_grad()
    def stream(
        self,
        ids: torch.Tensor,
        max_new_tokens: int,
        pick: Callable[[torch.Tensor], int] | None = None,
        stop: frozenset[int] = frozenset(),
        sparse: bool = True,
        timings: dict[str, float] | None = None,
    ) -> Iterator[int]:
        """Yield up to `max_new_tokens` tokens after the prompt `ids` (1, P), one at a
        time, as they are decoded; `pick` maps last-position logits (vocab,) to a token
        (default greedy). Stops after a token in `stop`. `timings` (if given) receives
        prefill_s and decode_s (time spent in the model, not in the consumer)."""
        pick = pick or (lambda logits: int(logits.argmax()))
        times = timings if timings is not None else {}
        times["prefill_s"] = times["decode_s"] = 0.0
        if ids.shape[1] + max_new_tokens > self.max_len:
            raise ValueError(
                f"{ids.shape[1]} prompt + {max_new_tokens} new tokens exceed max_len={self.max_len}"
            )
        self.reset(1)
        t0 = time.perf_counter()
        logits = self.forward(ids, 0, sparse, last_only=True)
        times["prefill_s"] = time.perf_counter() - t0
        pos = ids.shape[1]
        for i in range(max_new_tokens):
            token = pick(logits[0, -1])
            yield token
            if token in stop or i == max_new_tokens - 1:
                return
            t1 = time.perf_counter()
            logits = self.forward(torch.tensor([[token]]), pos, sparse)
            times["decode_s"] += time.perf_counter() - t1
            pos += 1

    def weight_bytes(self) -> int:
        """Bytes of packed weights a decode step reads (block projections and LM head)."""
        return sum(p.nbytes for p in self._all_projs())

    def resident_bytes(self) -> int:
        """Bytes of weights this runtime keeps for decoding: its packed projections, the
        model tensors fp32 projections share, the embedding (unless read from the packed
        head) and the norms."""
        total = self.weight_bytes()
        total += sum(
            p.weight_fp32.numel() * 4 for p in self._all_projs() if p.weight_fp32 is not None
        )
        if self.embed_packed is None:
            total += self.embed.weight.numel() * self.embed.weight.element_size()
        norms = [self.final_norm, *(n for ly in self.layers for n in (ly.attn_norm, ly.mlp_norm))]
        return total + sum(n.weight.numel() * n.weight.element_size() for n in norms)

    def release_model_weights(self) -> None:
        """Drop the model's block-linear and head weights once the runtime holds packed
        copies of all of them (the model is then only good for this runtime; embedding,
        norms and rotary stay), so RAM holds the packed bytes, not fp32 ones too.
        fp32 projections share the model's tensors, so nothing is freed for them."""
        if any(p.packed.kind == "fp32" for p in self._all_projs()):
            return
        empty = nn.Parameter(torch.empty(0), requires_grad=False)
        for block in get_blocks(self.model):
            for module in block.modules():
                if isinstance(module, nn.Linear):
                    module.weight = empty
        head = self.model.get_output_embeddings()
        if self.embed.weight is head.weight and self.embed_packed is not None:
            self.embed.weight = empty
        head.weight = empty

    def skipped_fraction(self) -> float | None:
        """Share of the thresholded projections' weight reads skipped in decode steps."""
        self._fold_counts()
        kept = sum(p.kept for p in self.projections())
        seen = sum(p.seen for p in self.projections())
        return None if seen == 0 else 1.0 - kept / seen
