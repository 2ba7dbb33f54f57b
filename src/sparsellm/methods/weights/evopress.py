"""EvoPress (Sieberling et al., 2024): evolutionary search for per-layer sparsity levels.

Uniform sparsity is rarely optimal, and per-layer error proxies don't add up to the
model's error. EvoPress instead searches level assignments directly and scores each
candidate by what it does to the whole model: KL(dense ‖ candidate) of the next-token
distributions on calibration tokens.

* **Level database**, built once: every selected layer pruned at every level
  (target ± k·step) by the step's own method, from statistics of one dense calibration
  pass. Switching a layer's level is then a weight copy, not a re-prune.
* **Search** ((1 + λ) evolution): each generation makes λ offspring of the parent by
  `mutations` *level switches*: one layer up a level, another layer of the same size
  down a level. Same-size pairs keep the global sparsity exactly at the target, at
  every step. The best offspring replaces the parent if its KL is lower (elitist).
* **Resumable**: after every generation the state (levels, fitness, generation, RNG)
  goes to `evo_state` (a JSON file written atomically); a rerun with the same file
  continues from there.

Differences from the paper, for a CPU: one fitness set (the paper's multi-step
selection with growing token budgets is left out) and the final model is pruned
sequentially with the found budgets, like every other allocation.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sparsellm.calib.hooks import input_hooks
from sparsellm.calib.sequential import run_sequential
from sparsellm.eval.perplexity import next_token_logits
from sparsellm.export.hf import write_json_atomic
from sparsellm.methods.weights.base import LayerContext
from sparsellm.models.adapters import set_weight_matrix, weight_matrix


def level_grid(target: float, step: float, k: int) -> list[float]:
    """target - k·step … target + k·step, evenly spaced inside [0, 0.99].

    k shrinks near the ends instead of clipping, so a +1/-1 switch between two layers
    of one size always leaves their total number of zeros unchanged.
    """
    k = min(k, int(target / step + 1e-9), int((0.99 - target) / step + 1e-9))
    return [round(target + i * step, 6) for i in range(-k, k + 1)]


def mutate(
    levels: dict[str, int], groups: list[list[str]], n_levels: int, rng: random.Random, n: int
) -> dict[str, int]:
    """`n` level switches, each +1 on one layer and -1 on another of the same size."""
    child = dict(levels)
    candidates = [g for g in groups if len(g) > 1]
    if not candidates:
        return child
    for _ in range(n):
        for _attempt in range(20):
            group = rng.choice(candidates)
            up, down = rng.sample(group, 2)
            if child[up] + 1 < n_levels and child[down] > 0:
                child[up] += 1
                child[down] -= 1
                break
    return child


@torch.no_grad()
def kl_to_dense(model: nn.Module, ids: torch.Tensor, dense_logprobs: list[torch.Tensor]) -> float:
    """Mean token KL(dense ‖ model) over `ids` (batches matching `dense_logprobs`)."""
    total, tokens = 0.0, 0
    for batch, lp_d in zip(ids.split(len(ids) // len(dense_logprobs)), dense_logprobs, strict=True):
        lp = F.log_softmax(next_token_logits(model, batch), -1)
        total += F.kl_div(lp, lp_d, log_target=True, reduction="sum").item()
        tokens += lp.shape[0]
    return total / tokens


@torch.no_grad()
def build_database(
    model: nn.Module,
    selected: list[dict[str, nn.Module]],
    calib: torch.Tensor,
    pruner: Any,
    levels: list[float],
    batch_size: int,
    dtype: torch.dtype | None,
) -> dict[str, list[torch.Tensor]]:
    """fqn -> the layer's weight pruned at each level (dense-propagated statistics)."""
    database: dict[str, list[torch.Tensor]] = {}
    stats_cls = pruner.stats

    def process_block(i: int, block: nn.Module, forward: Any) -> None:
        chosen = selected[i]
        if not chosen:
            return
        stats: dict[str, Any] = {}
        if stats_cls is not None:

            def update(fqn: str, x: torch.Tensor) -> None:
                if fqn not in stats:
                    stats[fqn] = stats_cls(x.shape[-1])
                stats[fqn].update(x.detach())

            with input_hooks(chosen, update):
                forward()
        for fqn, module in chosen.items():
            w = weight_matrix(module).float()
            database[fqn] = [
                pruner.prune(w, stats.get(fqn), LayerContext(sparsity=s)).to(module.weight.dtype)
                for s in levels
            ]

    run_sequential(model, list(calib.split(batch_size)), process_block, "evopress db", dtype)
    return database


def _apply(modules: dict[str, nn.Module], database: dict[str, list[torch.Tensor]], levels):
    for fqn, level in levels.items():
        set_weight_matrix(modules[fqn], database[fqn][level])


@torch.no_grad()
def evopress_layer_sparsity(
    model: nn.Module,
    selected: list[dict[str, nn.Module]],
    calib: torch.Tensor,
    pruner: Any,
    target: float,
    *,
    step: float = 0.05,
    k: int = 3,
    generations: int = 30,
    offspring: int = 8,
    mutations: int = 2,
    fitness_windows: int = 4,
    state_path: str | None = None,
    seed: int = 0,
    batch_size: int = 8,
    dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Per-layer sparsity found by the search (the model's weights are left unchanged)."""
    modules = {fqn: m for chosen in selected for fqn, m in chosen.items()}
    originals = {fqn: weight_matrix(m).clone() for fqn, m in modules.items()}
    grid = level_grid(target, step, k)
    base = grid.index(round(target, 6))
    fit_ids = calib[:fitness_windows]
    dense_lp = [F.log_softmax(next_token_logits(model, b), -1) for b in fit_ids.split(1)]
    database = build_database(model, selected, calib, pruner, grid, batch_size, dtype)
    by_size: dict[int, list[str]] = defaultdict(list)
    for fqn, w in originals.items():
        by_size[w.numel()].append(fqn)
    groups = list(by_size.values())

    rng = random.Random(seed)
    state_file = Path(state_path) if state_path else None
    if state_file and state_file.is_file():
        state = json.loads(state_file.read_text(encoding="utf-8"))
        if state.get("grid") != grid or set(state["levels"]) != set(modules):
            raise ValueError(f"{state_file} belongs to a different search; remove it")
        parent, fitness, start = state["levels"], state["fitness"], state["generation"]
        rng.setstate(_tuple_state(state["rng"]))
        history = state.get("history", [])
    else:
        parent, start, history = dict.fromkeys(modules, base), 0, []
        _apply(modules, database, parent)
        fitness = kl_to_dense(model, fit_ids, dense_lp)
    try:
        for gen in tqdm(range(start, generations), desc="evopress", unit="gen"):
            best, best_fit = None, fitness
            for _ in range(offspring):
                child = mutate(parent, groups, len(grid), rng, mutations)
                _apply(modules, database, child)
                fit = kl_to_dense(model, fit_ids, dense_lp)
                if fit < best_fit:
                    best, best_fit = child, fit
            if best is not None:
                parent, fitness = best, best_fit
            history.append(fitness)
            if state_file:
                write_json_atomic(
                    state_file,
                    {
                        "grid": grid,
                        "levels": parent,
                        "fitness": fitness,
                        "generation": gen + 1,
                        "rng": rng.getstate(),
                        "history": history,
                    },
                )
    finally:
        for fqn, m in modules.items():
            set_weight_matrix(m, originals[fqn])
    return {fqn: grid[level] for fqn, level in parent.items()}


def _tuple_state(state: list) -> tuple:
    """random.Random state back from its JSON form (lists -> tuples)."""
    return (state[0], tuple(state[1]), state[2])
