"""SeerAttention (Gao et al., 2024): a small learned gate predicts block-level attention.

The frozen model's attention is left alone; only the gate learns, by self-distillation.
Per full-attention layer the gate pools each block of position-free queries (mean) and
keys (max, min and mean, concatenated), projects both per head to `dim` dimensions,
rotates the projections by RoPE at their blocks' positions, and scores every causal
(query block, key block) pair by their dot product. Pooling before RoPE matters: a mean
over a block of rotated vectors cancels the dimensions that turn fast, and what they held
never reaches the gate. Its target is the model's own attention map pooled to blocks and
renormalised per query block; the loss is the KL divergence from that target to the gate's
softmax. The paper max-pools each block pair (``target=max``: a block holding one sharp
match scores high); our default pools the attention mass (``target=mass``), the share of
the query block's attention that the kernel keeps or drops with that block. Max-pooled
ranks are set by single query-key pairs, and a block with one sharp match can hold less
attention than its neighbours: even the exact attention mass misses a share of the
max-ranked top blocks (``bench/seer.py`` measures how much). At prefill the gate's top
`blocks` key blocks per query block (plus the sink and the local window, the same budget as
``block_topk:blocks=N``) run on the shared block-sparse kernel.

Training data comes from the calibration protocol: `GateTraining` observes the post-RoPE
query and key of every full-attention layer during ordinary forwards, undoes the rotation
(the method is bound to the model's rotary base first) and stores only the pooled features
and the pooled target, then fits each layer's gate alone (the layers' losses are
independent: no gradient passes through the model).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from sparsellm.errors import SparseLLMError
from sparsellm.methods.attention import patterns as P
from sparsellm.methods.attention.prefill import pool
from sparsellm.methods.attention.protocols import PrefillConfig, attention_method
from sparsellm.methods.attention.rope import RotaryBound, rope_angles, rotate, unrotate
from sparsellm.models.adapters import full_attention_layers, get_blocks

Gate = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # wq (Hq, D, G), wk (Hkv, 3D, G), bias
BUCKETS = 17  # distance buckets 0, 1, 2-3, 4-7, ... (block distances up to 2^16)
FEATURES = "pre-rope"  # what saved gates were trained on (older files pooled post-RoPE)
TARGETS = ("mass", "max")  # the block maps a gate can learn (see block_truth)


def check_targets(names: tuple[str, ...]) -> None:
    """Refuse a target name that `block_truth` cannot pool (one message everywhere)."""
    unknown = sorted(set(names) - set(TARGETS))
    if unknown:
        raise SparseLLMError(
            f"seer: unknown target {', '.join(unknown)}; valid: {', '.join(TARGETS)}"
        )


def distance_buckets(nb: int) -> torch.Tensor:
    """(nb, nb) log2 bucket of the block distance (query block - key block, >= 0): 0 for
    the diagonal, then 1 + floor(log2(distance)); the gate learns one bias per bucket."""
    d = (torch.arange(nb)[:, None] - torch.arange(nb)[None, :]).clamp(min=0)
    out = torch.zeros(nb, nb, dtype=torch.long)
    pos = d > 0
    out[pos] = torch.floor(torch.log2(d[pos].double())).long() + 1
    return out.clamp(max=BUCKETS - 1)


def _padded_blocks(x: torch.Tensor, block: int, fill: float) -> torch.Tensor:
    """(B, H, L, D) -> (B, H, nb, block, D), the tail block padded with `fill`."""
    b, h, length, d = x.shape
    nb = P.n_blocks(length, block)
    x = torch.nn.functional.pad(x, (0, 0, 0, nb * block - length), value=fill)
    return x.reshape(b, h, nb, block, d)


def gate_features(
    query: torch.Tensor, key: torch.Tensor, block: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate's inputs from post-RoPE `query` and `key` at positions 0 … L-1 (rotary
    base `theta`): the rotation undone, mean-pooled query blocks ``(B, Hq, nb, D)`` and key
    blocks pooled by max, min and mean ``(B, Hkv, nb, 3D)`` (max and min keep a single
    outlying key visible that a mean would wash out)."""
    query, key = unrotate(query, theta), unrotate(key, theta)
    kmax = _padded_blocks(key, block, float("-inf")).amax(3)
    kmin = _padded_blocks(key, block, float("inf")).amin(3)
    return pool(query, block), torch.cat([kmax, kmin, pool(key, block)], -1)


def block_truth(
    query: torch.Tensor,
    key: torch.Tensor,
    block: int,
    scale: float,
    chunk: int = 8,
    pools: tuple[str, ...] = TARGETS,
) -> dict[str, torch.Tensor]:
    """The distillation targets ``(B, Hkv, nb, nb)`` from the exact causal attention, one
    per name in `pools`: ``max``, the paper's, max-pooled over each (query block, key
    block) pair, so a block holding one sharp match scores high; ``mass``, the attention a
    query block gives each key block (summed over its keys, averaged over its queries),
    which is what the block-sparse kernel keeps or loses. Each query block's row is
    renormalised to sum to one and averaged over the GQA group. Computed `chunk` query
    blocks at a time so an 8k map never exists whole, each against the keys it can see
    only (half the work of a square map)."""
    check_targets(pools)
    b, hq, length, _ = query.shape
    hkv = key.shape[1]
    nb = P.n_blocks(length, block)
    k = key.repeat_interleave(hq // hkv, 1)
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in pools}
    for start in range(0, nb, chunk):
        lo, hi = start * block, min((start + chunk) * block, length)
        s = (query[:, :, lo:hi] @ k[:, :, :hi].transpose(-1, -2)) * scale
        qpos = torch.arange(lo, hi)[:, None]
        s = s.masked_fill(torch.arange(hi)[None, :] > qpos, float("-inf"))
        p = torch.softmax(s, -1)
        rb, kb = P.n_blocks(hi - lo, block), P.n_blocks(hi, block)
        p = torch.nn.functional.pad(p, (0, kb * block - hi, 0, rb * block - (hi - lo)))
        p = p.reshape(b, hq, rb, block, kb, block)
        for name in pools:
            # padded query rows are zero: they never raise a max, and a mass row is
            # renormalised below, so the tail block's mean needs no correction
            pooled = p.amax(5).amax(3) if name == "max" else p.sum(5).sum(3)
            pooled = torch.nn.functional.pad(pooled, (0, nb - kb))  # keys past the chunk
            rows[name].append(pooled / pooled.sum(-1, keepdim=True))
    return {
        name: torch.cat(r, 2).reshape(b, hkv, hq // hkv, nb, nb).mean(2) for name, r in rows.items()
    }


def gate_log_probs(
    gate: Gate, qf: torch.Tensor, kf: torch.Tensor, theta: float, block: int
) -> torch.Tensor:
    """Log of the gate's block distribution ``(B, Hkv, nb, nb)`` (0 off the causal
    triangle): the projections are rotated by RoPE (base `theta`, over the gate's own
    width) at their blocks' first positions, so a score depends on the block distance as
    the model's own attention does; each query head scores the key blocks of its KV head,
    the softmaxes are averaged over the group, as the target is. A learned bias per head
    and log2 distance bucket adds what the rotation leaves out (recency)."""
    wq, wk, bias = gate
    hq, hkv = wq.shape[0], wk.shape[0]
    nb = qf.shape[2]
    angles = rope_angles(torch.arange(nb) * block, theta, wq.shape[-1])
    qg = rotate(torch.einsum("bhnd,hdg->bhng", qf, wq), angles)
    kg = rotate(torch.einsum("bhnd,hdg->bhng", kf, wk), angles).repeat_interleave(hq // hkv, 1)
    s = (qg @ kg.transpose(-1, -2)) / math.sqrt(wq.shape[-1])
    s = s + bias[:, distance_buckets(nb)]
    causal = P.causal_blocks(nb, s.device)
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
    p = p.reshape(p.shape[0], hkv, hq // hkv, nb, nb).mean(2)
    return p.clamp_min(1e-30).log().masked_fill(~causal, 0.0)


def kl_to_truth(truth: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """Mean over query blocks (the first, which has one choice, excluded) of
    KL(truth ‖ gate) — the self-distillation loss."""
    t = truth[..., 1:, :]
    kl = (t * (t.clamp_min(1e-30).log() - log_probs[..., 1:, :])).sum(-1)
    return kl.mean()


def fit_gate(
    data: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    dim: int,
    steps: int,
    lr: float,
    theta: float,
    block: int,
    seed: int = 0,
) -> Gate:
    """One layer's gate fitted by Adam on every observed window's (query features, key
    features, target), full batch. Features are scaled by their RMS first (kept in the
    weights), so one learning rate serves models whose q/k norms differ."""
    qf0, kf0, _ = data[0]
    hq, d = qf0.shape[1], qf0.shape[-1]
    hkv = kf0.shape[1]
    gen = torch.Generator().manual_seed(seed)
    qs = torch.cat([q.flatten() for q, _, _ in data]).pow(2).mean().sqrt().clamp_min(1e-6)
    ks = torch.cat([k.flatten() for _, k, _ in data]).pow(2).mean().sqrt().clamp_min(1e-6)
    wq = (torch.randn(hq, d, dim, generator=gen) / math.sqrt(d)).requires_grad_()
    wk = (torch.randn(hkv, 3 * d, dim, generator=gen) / math.sqrt(3 * d)).requires_grad_()
    bias = torch.zeros(hq, BUCKETS, requires_grad=True)
    opt = torch.optim.Adam([wq, wk, bias], lr=lr)
    with torch.enable_grad():  # calibration runs under no_grad; only the gate learns
        for _ in range(steps):
            opt.zero_grad()
            loss = sum(
                kl_to_truth(t, gate_log_probs((wq, wk, bias), q / qs, k / ks, theta, block))
                for q, k, t in data
            )
            (loss / len(data)).backward()
            opt.step()
    return (wq.detach() / qs, wk.detach() / ks, bias.detach())


def _top_blocks(x: torch.Tensor, density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The causal blocks each query block keeps at `density` (``ceil(density · causal
    blocks)``, at least one) ranked by `x` ``(..., nb, nb)``, and that count ``(nb,)``."""
    nb = x.shape[-1]
    causal = P.causal_blocks(nb, x.device)
    keep = torch.ceil(density * torch.arange(1, nb + 1, dtype=torch.float64)).clamp(min=1)
    keep = keep.long()
    order = x.masked_fill(~causal, float("-inf")).argsort(-1, descending=True)
    top = (torch.arange(nb)[None, :] < keep[:, None]).expand_as(order)
    return torch.zeros_like(order, dtype=torch.bool).scatter(-1, order, top), keep


def recall_at_density(scores: torch.Tensor, truth: torch.Tensor, density: float) -> float:
    """Share of the target's top key blocks that `scores` also ranks top, when each query
    block keeps ``ceil(density · causal blocks)`` of them (at least one): the gate's
    recall of the dense model's top attention blocks. Query block 0 (one choice) is left
    out. Both inputs are ``(..., nb, nb)``; non-causal entries are ignored."""
    got, keep = _top_blocks(scores, density)
    want, _ = _top_blocks(truth, density)
    hit = (got & want).sum(-1)[..., 1:].double()
    return float((hit / keep[1:]).mean())


def mass_recall_at_density(scores: torch.Tensor, truth: torch.Tensor, density: float) -> float:
    """The target's mass inside the blocks `scores` keeps at `density`, over the mass the
    best choice of as many blocks would hold (1.0: the gate loses nothing that matters,
    even where it swaps near-tied blocks). Query block 0 is left out."""
    got, _ = _top_blocks(scores, density)
    want, _ = _top_blocks(truth, density)
    t = truth[..., 1:, :]
    return float(((t * got[..., 1:, :]).sum(-1) / (t * want[..., 1:, :]).sum(-1)).mean())


@attention_method
@dataclass(frozen=True)
class Seer(RotaryBound, PrefillConfig):
    """SeerAttention: `blocks` key blocks per query block chosen by a gate learned from the
    model's own attention (calibration trains it), plus the sink block and the local
    window. ``gate=PATH`` loads gates saved by `save_gates` instead of training; `target`
    is the block map the gate learns (``mass`` or the paper's ``max``, see `block_truth`).
    `theta` is the model's rotary base, read from its config when the method is bound."""

    name: ClassVar[str] = "seer"

    blocks: int = 16
    sink: int = 64
    window: int = 128
    block: int = 64
    min_length: int = 2048
    tail: int = 0
    dim: int = 64
    steps: int = 300
    lr: float = 0.01
    gate: str = ""
    target: str = "mass"
    theta: float = 0.0
    gates: tuple[Gate | None, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dim < 2 or self.dim % 2:
            raise SparseLLMError("seer: dim must be even (the gate rotates pairs) and >= 2")
        if self.gate and not self.gates:
            gates, target = load_gates(self.gate)
            object.__setattr__(self, "gates", gates)
            object.__setattr__(self, "target", target)  # what the file's gates learned
        check_targets((self.target,))  # the one check, for a given and a loaded target

    def block_mask(self, query: torch.Tensor, key: torch.Tensor, layer: int) -> torch.Tensor:
        gate = self.gates[layer] if layer < len(self.gates) else None
        if gate is None:
            raise SparseLLMError(f"seer has no gate for layer {layer}: calibrate it first")
        theta = self.rotary_base()
        qf, kf = gate_features(query.float(), key.float(), self.block, theta)
        scores = gate_log_probs(gate, qf, kf, theta, self.block)
        nb = scores.shape[-1]
        always = P.sink_window_tokens(nb, self.sink, self.window, self.block)
        return P.topk_blocks(scores, self.blocks, always)

    def needs_calibration(self) -> bool:
        return not self.gates

    def calibration(self, tokens: int) -> GateTraining:
        if tokens < 4 * self.block:
            raise SparseLLMError(f"seer's gate trains on >= {4 * self.block} tokens")
        self.rotary_base()  # the gate undoes the model's RoPE while it observes
        return GateTraining(self)


Observed = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]  # qf, kf, targets


class GateTraining:
    """SeerAttention's `Calibration`: stores every observed forward's pooled features and
    targets per full-attention layer (any number of forwards), then fits each layer's gate.
    `pools` names the targets kept (the base's own by default; a bench comparing targets
    keeps several from the same forwards and fits one gate per target)."""

    def __init__(self, base: Seer, pools: tuple[str, ...] = ()) -> None:
        self.base = base
        self.pools = pools or (base.target,)
        check_targets(self.pools)  # here, not at the first forward hook
        self.data: dict[int, list[Observed]] = {}

    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        q, k = query.float(), key.float()
        qf, kf = gate_features(q, k, self.base.block, self.base.theta)
        targets = block_truth(q, k, self.base.block, scale, pools=self.pools)
        self.data.setdefault(layer, []).append((qf, kf, targets))

    def result(self, model: torch.nn.Module, target: str = "") -> Seer:
        """The base config (its `target` replaced by `target` if given) with a gate fitted
        to that target per full-attention layer (None for sliding-window layers, which keep
        their own window under any method)."""
        if sorted(self.data) != full_attention_layers(model):
            raise SparseLLMError("calibration did not reach every full-attention layer")
        b = dataclasses.replace(self.base, target=target) if target else self.base
        if b.target not in self.pools:
            raise SparseLLMError(f"seer: target {b.target} was not observed ({self.pools})")

        def fit(layer: int) -> Gate:
            data = [(qf, kf, t[b.target]) for qf, kf, t in self.data[layer]]
            return fit_gate(data, b.dim, b.steps, b.lr, b.theta, b.block, seed=layer)

        gates = tuple(fit(i) if i in self.data else None for i in range(len(get_blocks(model))))
        return dataclasses.replace(b, gates=gates)


def save_gates(config: Seer, path: str) -> None:
    """Write a calibrated config's gates to a safetensors file (``gate=PATH`` reads it)."""
    from safetensors.torch import save_file

    tensors = {}
    for i, g in enumerate(config.gates):
        if g is not None:
            for part, t in zip(("wq", "wk", "bias"), g, strict=True):
                tensors[f"{i}.{part}"] = t.contiguous()
    meta = {
        "method": "seer",
        "layers": str(len(config.gates)),
        "features": FEATURES,
        "target": config.target,  # what the gates learned: a loaded config reports it
    }
    save_file(tensors, path, metadata=meta)


def load_gates(path: str) -> tuple[tuple[Gate | None, ...], str]:
    """The per-layer gates saved by `save_gates` (None where a layer has none) and the
    target they learned (files written before targets were recorded learned ``max``)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("method") != "seer":
                raise SparseLLMError(f"{path} holds no seer gates")
            if meta.get("features") != FEATURES:
                raise SparseLLMError(
                    f"{path} holds seer gates trained on post-RoPE features: train them again"
                )
            names = set(f.keys())
            gates = tuple(
                tuple(f.get_tensor(f"{i}.{part}") for part in ("wq", "wk", "bias"))
                if f"{i}.wq" in names
                else None
                for i in range(int(meta["layers"]))
            )
            return gates, meta.get("target", "max")
    except OSError as exc:
        raise SparseLLMError(f"cannot read seer gates {path}: {exc}") from exc
