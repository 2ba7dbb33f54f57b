"""Shrink a copy of a dense model, evaluate it beside the dense one, optionally recover.

Shared by `sparsellm shrink` and `bench/structured.py`, so both report the same fields.
Recovery reuses the distillation of `recover.distill` (KL to the dense teacher). Its
per-layer feature loss pairs block outputs one to one, which holds for width pruning
(same depth, same residual width) but not after dropping blocks or slicing the residual
stream, so depth-pruned and SliceGPT students distil on the KL term only.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from sparsellm.config import MethodConfig
from sparsellm.eval.kl import compare_models
from sparsellm.methods.structured.base import apply_structured
from sparsellm.models.adapters import get_blocks
from sparsellm.recover.distill import DistillConfig, distill, summary


def recover(
    student: nn.Module,
    teacher: nn.Module,
    data: torch.Tensor,
    steps: int,
    batch_size: int = 4,
    lr: float = 1e-4,
    seed: int = 0,
    bf16: bool = False,
) -> dict[str, Any]:
    """Distil `student` towards `teacher` for `steps` steps on token windows `data`
    (`bf16`: autocast forwards, ~3x faster on CPUs with bf16 instructions)."""
    same_depth = len(get_blocks(student)) == len(get_blocks(teacher))
    same_depth &= student.config.hidden_size == teacher.config.hidden_size
    cfg = DistillConfig(
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        feature_weight=1.0 if same_depth else 0.0,
        warmup=max(steps // 10, 1),
        seed=seed,
        bf16=bf16,
    )
    return {**summary(distill(student, teacher, data, cfg)), "feature_loss": same_depth}


def shrink_and_evaluate(
    dense: nn.Module,
    config: MethodConfig | dict[str, Any] | str,
    calib_ids: torch.Tensor,
    eval_ids: torch.Tensor,
    recover_steps: int = 0,
    batch_size: int = 4,
    seed: int = 0,
    recover_bf16: bool = False,
    train_ids: torch.Tensor | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """(shrunk copy, result): perplexity/KL vs dense before and (optionally) after recovery.

    `config` is any spelling `apply_structured` takes (config, mapping, spec string).

    Recovery trains on `train_ids` when given, else on the calibration windows: a few
    steps barely repeat them, but a longer run should see text the pruning did not fit.
    """
    torch.manual_seed(seed)
    student = copy.deepcopy(dense)
    result: dict[str, Any] = {"shrink": apply_structured(student, config, calib_ids, batch_size)}
    result["before"] = compare_models(dense, student, eval_ids, batch_size)
    if recover_steps > 0:
        result["recovery"] = recover(
            student,
            dense,
            calib_ids if train_ids is None else train_ids,
            recover_steps,
            seed=seed,
            bf16=recover_bf16,
        )
        result["after"] = compare_models(dense, student, eval_ids, batch_size)
    return student, result
