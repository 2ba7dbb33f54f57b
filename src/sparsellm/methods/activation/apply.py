"""Calibrate activation thresholds block by block and wrap the model (reference path).

Block i is calibrated on the outputs of the already-sparse blocks before it (the same
sequential walk as weight pruning), so each threshold sees the activations it will
meet at inference and the measured sparsity stays at the target.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from sparsellm.calib.sequential import run_sequential
from sparsellm.config import MethodConfig
from sparsellm.errors import SparseLLMError
from sparsellm.methods.activation.base import ActivationConfig, ActivationMethod
from sparsellm.methods.activation.deltallm import calibrate_threshold
from sparsellm.methods.activation.modules import (
    ActSparseLinear,
    TemporalDeltaLinear,
    ThresholdedActivation,
    replace_module,
)
from sparsellm.methods.activation.thresholds import (
    LEVELS,
    greedy_levels,
    quantile_threshold,
    relative_error,
)
from sparsellm.models.adapters import get_layout
from sparsellm.registry import handler


def activation_method(config: MethodConfig) -> ActivationMethod:
    """The registered method of `config`, checked against the options it supports.

    Needs no model, so a caller can run it before loading one and fail fast on a bad
    combination (`head` with a gate method) that the config alone cannot see.
    """
    if not isinstance(config, ActivationConfig):
        raise SparseLLMError(f"{config.name!r} is a {config.family} method, not activation")
    method = handler(config)(config)
    if config.head and method.target != "inputs":
        raise SparseLLMError(f"head sparsity needs an input method, not {config.name!r}")
    return method


@contextmanager
def _capture(modules: dict[str, nn.Module], outputs: bool) -> Iterator[dict[str, list]]:
    """Collect each module's first input (or its output) as (tokens, features) rows."""
    seen: dict[str, list] = {name: [] for name in modules}
    handles = []
    try:
        for name, mod in modules.items():
            if outputs:
                handles.append(
                    mod.register_forward_hook(
                        lambda _m, _a, out, n=name: seen[n].append(out.reshape(-1, out.shape[-1]))
                    )
                )
            else:
                handles.append(
                    mod.register_forward_pre_hook(
                        lambda _m, args, n=name: seen[n].append(
                            args[0].reshape(-1, args[0].shape[-1])
                        )
                    )
                )
        yield seen
    finally:
        for h in handles:
            h.remove()


def _rows(chunks: list[torch.Tensor], limit: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.cat(chunks).float()
    if x.shape[0] > limit:
        x = x[torch.randperm(x.shape[0], generator=gen)[:limit]]
    return x


def _fit_inputs(
    block: nn.Module,
    groups: tuple[tuple[str, ...], ...],
    xs: dict[str, torch.Tensor],
    method: ActivationMethod,
    config: ActivationConfig,
) -> dict[str, Any]:
    """Thresholds for each input group of one block, then wrap its linears."""
    fused, scales, factors, scores, costs = [], [], [], [], []
    for group in groups:
        w = torch.cat([block.get_submodule(n).weight.detach().float() for n in group])
        scale = method.channel_scale(w)
        x = xs[group[0]]
        fused.append(w)
        scales.append(scale)
        factors.append(method.low_rank(w))
        scores.append(x.abs() if scale is None else x.abs() * scale)
        costs.append(w.numel())
    if config.allocation == "uniform":
        levels = [config.sparsity] * len(groups)
    else:
        errors = torch.tensor(
            [
                [
                    relative_error(
                        xs[g[0]],
                        fused[j],
                        scores[j] > quantile_threshold(scores[j], lv),
                        factors[j],
                    )
                    for lv in LEVELS
                ]
                for j, g in enumerate(groups)
            ]
        )
        levels = greedy_levels(
            errors, torch.tensor(costs, dtype=torch.float64), LEVELS, config.sparsity
        )
    out: dict[str, Any] = {}
    for j, group in enumerate(groups):
        thr = quantile_threshold(scores[j], levels[j])
        row = 0
        for name in group:
            lin = block.get_submodule(name)
            rows = slice(row, row + lin.weight.shape[0])
            row = rows.stop
            low = None if factors[j] is None else (factors[j][0][rows], factors[j][1])
            replace_module(block, name, ActSparseLinear(lin, thr, scales[j], low))
        out[group[0].rsplit(".", 1)[-1]] = {"level": round(levels[j], 4), "threshold": thr}
    return out


def _fit_deltas(
    block: nn.Module,
    groups: tuple[tuple[str, ...], ...],
    firsts: dict[str, nn.Module],
    forward: Any,
    config: ActivationConfig,
) -> dict[str, Any]:
    """DeltaLLM: per input group, the threshold whose skipped fraction on the calibration
    sequences (kept in token order, at most `max_tokens` tokens) is the target."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in firsts}
    handles = [
        mod.register_forward_pre_hook(lambda _m, args, n=name: seen[n].append(args[0].detach()))
        for name, mod in firsts.items()
    ]
    try:
        forward()
    finally:
        for h in handles:
            h.remove()
    out: dict[str, Any] = {}
    for group in groups:
        x = torch.cat(seen[group[0]]).float()
        x = x[: max(1, config.max_tokens // x.shape[1])]  # whole sequences, in order
        thr = calibrate_threshold(x, config.sparsity)
        for name in group:
            replace_module(block, name, TemporalDeltaLinear(block.get_submodule(name), thr))
        out[group[0].rsplit(".", 1)[-1]] = {"level": config.sparsity, "threshold": thr}
    return out


def sparsify_activations(
    model: nn.Module, calib: torch.Tensor, config: ActivationConfig, batch_size: int = 4
) -> dict[str, Any]:
    """Calibrate and wrap `model` in place; returns per-block levels and thresholds.

    `calib` is (n, seqlen) token ids; `config` is any registered activation method's
    config (`TEALConfig(0.5)`, or ``from_spec("wina:sparsity=0.5")``). Undo with
    `unwrap_activations`.
    """
    method = activation_method(config)
    layout = get_layout(model)
    gen = torch.Generator().manual_seed(config.seed)
    batches = list(calib.split(batch_size))
    per_block: list[dict[str, Any]] = []

    def process(i: int, block: nn.Module, forward: Any) -> None:
        if method.target == "gate":
            act = block.get_submodule(layout.gate_act)
            with _capture({"gate": act}, outputs=True) as seen:
                forward()
            a = _rows(seen["gate"], config.max_tokens * 4, gen)
            thr = quantile_threshold(a.abs(), config.sparsity)
            hidden = block.get_submodule(layout.input_groups[-1][0]).weight.shape[0]
            replace_module(block, layout.gate_act, ThresholdedActivation(act, thr, 2 * hidden))
            per_block.append({"gate": {"level": config.sparsity, "threshold": thr}})
            return
        firsts = {g[0]: block.get_submodule(g[0]) for g in layout.input_groups}
        if method.target == "delta":
            per_block.append(_fit_deltas(block, layout.input_groups, firsts, forward, config))
            return
        with _capture(firsts, outputs=False) as seen:
            forward()
        xs = {n: _rows(v, config.max_tokens, gen) for n, v in seen.items()}
        per_block.append(_fit_inputs(block, layout.input_groups, xs, method, config))

    model.eval()
    run_sequential(model, batches, process, desc=f"{config.name} thresholds")
    out: dict[str, Any] = {"method": config.name, "sparsity": config.sparsity}
    if config.head:
        out["head"] = _fit_head(model, batches, method, config, gen)
    return {**out, "blocks": per_block}


def _fit_head(
    model: nn.Module,
    batches: list[torch.Tensor],
    method: ActivationMethod,
    config: ActivationConfig,
    gen: torch.Generator,
) -> dict[str, Any]:
    """Threshold the LM head's input at the target level, on the sparse model's own
    final hidden states (the blocks are already wrapped, as at inference)."""
    head = model.get_output_embeddings()
    name = next(n for n, m in model.named_modules() if m is head)
    with _capture({name: head}, outputs=False) as seen, torch.no_grad():
        for batch in batches:
            model(batch)
    x = _rows(seen[name], config.max_tokens, gen)
    w = head.weight.detach().float()
    scale = method.channel_scale(w)
    thr = quantile_threshold(x.abs() if scale is None else x.abs() * scale, config.sparsity)
    replace_module(model, name, ActSparseLinear(head, thr, scale, method.low_rank(w)))
    return {"level": config.sparsity, "threshold": thr}
