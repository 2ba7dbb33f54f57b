"""Distillation fine-tuning of a sparse student from its dense teacher, masks frozen.

Loss per batch (SquareHead, Kurtic et al. 2023, plus logit distillation):

    L = kl_weight · KL(p_teacher ‖ p_student)   (mean over tokens, temperature T, ×T²)
      + feature_weight · Σ_l ‖h_l^s − h_l^t‖² / ‖h_l^t‖²   (every block's output)

The per-layer normalisation keeps layers with large activations from dominating; the
KL term matches the output distribution the perplexity and task scores read. Training
updates every parameter that requires grad (all weights, or only LoRA adapters after
`add_lora`); pruned weights stay exactly zero (`FrozenMasks`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sparsellm.errors import SparseLLMError
from sparsellm.recover.masks import FrozenMasks


@dataclass(frozen=True)
class DistillConfig:
    """Optimiser and loss settings (defaults sized for a 135M model on a CPU)."""

    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 4
    kl_weight: float = 1.0
    feature_weight: float = 1.0
    temperature: float = 1.0
    weight_decay: float = 0.0
    warmup: int = 10
    seed: int = 0
    max_seconds: float | None = None  # wall-time budget; the lr schedule follows it too
    # bf16 autocast for the forward passes (weights, optimiser and losses stay fp32): on
    # CPUs with AMX/AVX512-BF16 the matmuls run ~4x faster, so a time budget sees ~3x
    # more tokens; pruned weights stay exactly zero either way (they are fp32 masters).
    bf16: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise SparseLLMError("steps and batch_size must be >= 1")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise SparseLLMError(f"max_seconds must be > 0, got {self.max_seconds}")
        if self.lr <= 0 or self.temperature <= 0:
            raise SparseLLMError("lr and temperature must be > 0")


@dataclass
class DistillLog:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def kl_loss(student: torch.Tensor, teacher: torch.Tensor, t: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(softmax(teacher/t) ‖ softmax(student/t)) · t²."""
    s = F.log_softmax(student.float() / t, -1).flatten(0, -2)
    q = F.log_softmax(teacher.float() / t, -1).flatten(0, -2)
    return F.kl_div(s, q, log_target=True, reduction="batchmean") * t * t


def feature_loss(
    student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """Σ over layers of ‖h_s − h_t‖² / ‖h_t‖² (SquareHead's normalised MSE)."""
    total = torch.zeros(())
    for hs, ht in zip(student, teacher, strict=True):
        total = total + (
            hs.float() - ht.float()
        ).square().sum() / ht.float().square().sum().clamp_min(1e-12)
    return total


def _lr_at(step: int, cfg: DistillConfig, elapsed: float = 0.0) -> float:
    """Linear warmup, then cosine decay to 0 at `steps` or at `max_seconds`, whichever
    comes first (so a time-budgeted run still ends its schedule)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    if cfg.max_seconds:
        progress = max(progress, elapsed / cfg.max_seconds)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: torch.Tensor,
    cfg: DistillConfig | None = None,
    after_step: Callable[[float], None] | None = None,
    regularizer: Callable[[float], torch.Tensor] | None = None,
) -> DistillLog:
    """Fine-tune `student` in place on token windows `data` (n, seqlen) against `teacher`.

    `after_step(lr)` runs after every optimiser step with that step's learning rate: a
    method whose update is AdamW plus a proximal step (SoRA's gates) adds the latter there.
    `regularizer(progress)` is added to every step's loss right after the student's
    forward, `progress` ∈ [0, 1] the share of the step or time budget used (whichever is
    further): ProSparse's L1 on activations, whose factor rises over training.
    """
    cfg = cfg or DistillConfig()
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise SparseLLMError("the student has no trainable parameters")
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    teacher.eval()
    student.train()
    log = DistillLog()
    start = time.perf_counter()
    with FrozenMasks(student) as masks:
        for step in tqdm(range(cfg.steps), desc="distill", unit="step"):
            elapsed = time.perf_counter() - start
            if cfg.max_seconds and step and elapsed >= cfg.max_seconds:
                break
            idx = torch.randint(0, data.shape[0], (cfg.batch_size,), generator=gen)
            ids = data[idx]
            with torch.autocast(_device(student), torch.bfloat16, enabled=cfg.bf16):
                with torch.no_grad():
                    t_out = teacher(input_ids=ids, output_hidden_states=True, use_cache=False)
                s_out = student(input_ids=ids, output_hidden_states=True, use_cache=False)
            loss = cfg.kl_weight * kl_loss(s_out.logits, t_out.logits, cfg.temperature)
            if cfg.feature_weight:
                loss = loss + cfg.feature_weight * feature_loss(
                    s_out.hidden_states[1:], t_out.hidden_states[1:]
                )
            if regularizer is not None:
                budget = step / cfg.steps
                if cfg.max_seconds:
                    budget = max(budget, elapsed / cfg.max_seconds)
                loss = loss + regularizer(budget)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, cfg, elapsed)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            masks.reapply()
            if after_step is not None:
                after_step(opt.param_groups[0]["lr"])
            log.losses.append(loss.item())
    student.eval()
    log.seconds = time.perf_counter() - start
    return log


def _device(model: nn.Module) -> str:
    return next(model.parameters()).device.type


def summary(log: DistillLog) -> dict[str, Any]:
    k = max(len(log.losses) // 10, 1)
    return {
        "steps": len(log.losses),
        "first_loss": sum(log.losses[:k]) / k,
        "last_loss": sum(log.losses[-k:]) / k,
        "seconds": log.seconds,
    }
