"""The training loop the pre-training methods share: next-token loss, AdamW, and masks.

A method that trains sparse hands `train_lm` a `Masks` object: before every optimiser
step it zeroes the gradients of masked weights (so AdamW's moments for them stay zero)
and after it writes the zeros back (AdamW's weight decay would otherwise move them);
`update(step)` lets a schedule change the masks as training goes (gradual pruning).
Without masks the loop is plain dense training, which is also SPDF's dense fine-tuning.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sparsellm.errors import SparseLLMError
from sparsellm.models.adapters import block_linears, blocks_prefix, get_blocks


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser settings; `steps` windows-batches of `batch_size` rows of the data."""

    steps: int = 400
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.warmup < 0:
            raise SparseLLMError("steps and batch_size must be >= 1, warmup >= 0")
        if not self.lr > 0:
            raise SparseLLMError(f"lr must be > 0, not {self.lr}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def linear_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The block linears' weights by name: what sparse pre-training sparsifies and what the
    parameter counts below count (embeddings and norms are left out, as in both papers)."""
    prefix = blocks_prefix(model)
    return {
        f"{prefix}.{i}.{rel}.weight": module.weight
        for i, block in enumerate(get_blocks(model))
        for rel, module in block_linears(block).items()
    }


class Masks:
    """Keep-masks over some weights, enforced around every optimiser step."""

    def __init__(self, masks: dict[str, tuple[nn.Parameter, torch.Tensor]]) -> None:
        self.masks = masks

    def update(self, step: int) -> None:
        """Change the masks before `step` (a schedule's hook; static masks do nothing)."""

    @torch.no_grad()
    def mask_grads(self) -> None:
        for w, keep in self.masks.values():
            if w.grad is not None:
                w.grad.mul_(keep)

    @torch.no_grad()
    def apply(self) -> None:
        for w, keep in self.masks.values():
            w.mul_(keep)

    def kept(self) -> int:
        return sum(int(keep.sum()) for _, keep in self.masks.values())


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of `ids` (batch, seqlen)."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


@torch.no_grad()
def eval_loss(model: nn.Module, windows: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token loss over `windows` (nats per token)."""
    model.eval()
    losses = [lm_loss(model, b).item() * b.shape[0] for b in windows.split(batch_size)]
    return sum(losses) / windows.shape[0]


@dataclass
class TrainLog:
    losses: list[float] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)  # masked weights' non-zeros, per step
    seconds: float = 0.0


def train_lm(
    model: nn.Module, data: torch.Tensor, cfg: TrainConfig, masks: Masks | None = None
) -> TrainLog:
    """Train `model` in place on token windows `data` (n, seqlen), optionally under `masks`;
    returns the loss and the number of kept masked weights at every step."""
    gen = torch.Generator().manual_seed(cfg.seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    log = TrainLog()
    start = time.perf_counter()
    model.train()
    for step in tqdm(range(cfg.steps), desc="train", unit="step"):
        if masks is not None:
            masks.update(step)
            masks.apply()
        ids = data[torch.randint(0, data.shape[0], (cfg.batch_size,), generator=gen)]
        loss = lm_loss(model, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        if masks is not None:
            masks.mask_grads()
        opt.step()
        if masks is not None:
            masks.apply()
            log.kept.append(masks.kept())
        log.losses.append(loss.item())
    model.eval()
    log.seconds = time.perf_counter() - start
    return log
