"""MaskLLM at small scale (Fang et al., 2024): learnable N:M masks, weights frozen.

Every group of M consecutive input weights picks one of the C(M, N) candidate masks
(keep M−N of M). The choice is a categorical distribution with learnable logits,
sampled differentiably with Gumbel-softmax:

    soft mask of a group = Σ_k softmax((logits + g) / τ)_k · candidate_k

so the layer computes x (W ⊙ soft mask)ᵀ and the loss (KL to the dense model's next
token distribution on calibration text) trains the logits end to end. τ anneals from
`tau_start` to `tau_end`; logits start from a prior: the candidate matching the
current (SparseGPT/Wanda) mask gets `prior` more logit than the others, as the paper's
mask-prior initialisation. The hard mask at any step is the argmax candidate — a valid
N:M pattern by construction; at the end it is written into the weights, the wrappers
removed, and the model is a plain HF model again.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sparsellm.errors import SparseLLMError
from sparsellm.eval.perplexity import next_token_logits
from sparsellm.models.adapters import block_linears, get_blocks


def candidates(n: int, m: int) -> torch.Tensor:
    """(C(m, n), m) keep-masks with exactly m − n ones (n zeros), in a fixed order."""
    rows = []
    for zeros in itertools.combinations(range(m), n):
        rows.append([0.0 if j in zeros else 1.0 for j in range(m)])
    return torch.tensor(rows)


def prior_logits(keep: torch.Tensor, cands: torch.Tensor, prior: float) -> torch.Tensor:
    """(out, in/m, C) logits: `prior` on the candidate equal to each group's current mask."""
    out_f, in_f = keep.shape
    m = cands.shape[1]
    groups = keep.float().reshape(out_f, in_f // m, m)
    match = (groups.unsqueeze(2) == cands).all(-1).float()  # (out, g, C)
    return match * prior


class MaskLLMLinear(nn.Module):
    """A frozen linear whose N:M mask is sampled from learnable per-group logits."""

    def __init__(
        self, base_layer: nn.Linear, dense: torch.Tensor, n: int, m: int, prior: float
    ) -> None:
        super().__init__()
        if base_layer.in_features % m:
            raise SparseLLMError(f"in_features {base_layer.in_features} not divisible by {m}")
        self.base_layer = base_layer
        base_layer.weight.requires_grad_(False)
        self.register_buffer("cands", candidates(n, m), persistent=False)
        self.m = m
        keep = base_layer.weight.detach() != 0
        self.logits = nn.Parameter(prior_logits(keep, self.cands, prior))
        # the dense values: a learned mask may keep weights the initial mask pruned
        self.register_buffer("dense", dense.detach().float().clone(), persistent=False)
        self.tau = 1.0

    def soft_mask(self) -> torch.Tensor:
        probs = F.gumbel_softmax(self.logits, tau=self.tau, hard=False, dim=-1)
        return (probs @ self.cands).reshape(self.dense.shape)

    def hard_mask(self) -> torch.Tensor:
        return self.cands[self.logits.argmax(-1)].reshape(self.dense.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.soft_mask() if self.training else self.hard_mask()
        return F.linear(x, self.dense * mask, self.base_layer.bias)


@dataclass(frozen=True)
class MaskLLMConfig:
    n: int = 2
    m: int = 4
    steps: int = 200
    lr: float = 5e-2
    batch_size: int = 2
    tau_start: float = 4.0
    tau_end: float = 0.05
    prior: float = 3.0
    seed: int = 0
    # wall-time budget: training stops once it is spent, and τ's annealing follows
    # whichever of steps or time runs out first, so a budgeted run still ends cold
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise SparseLLMError(f"max_seconds must be > 0, got {self.max_seconds}")


@dataclass
class MaskLLMLog:
    losses: list[float] = field(default_factory=list)
    changed_fraction: float = 0.0
    seconds: float = 0.0


def _wrap(model: nn.Module, dense: nn.Module, cfg: MaskLLMConfig) -> list[MaskLLMLinear]:
    """Wrap every block linear of `model`, reading dense values from `dense`'s twin."""
    wrapped = []
    for block, twin in zip(get_blocks(model), get_blocks(dense), strict=True):
        twins = block_linears(twin)
        for rel, module in block_linears(block).items():
            if not isinstance(module, nn.Linear):
                raise SparseLLMError("MaskLLM here supports nn.Linear layers (not GPT-2 Conv1D)")
            parent_name, _, child = rel.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            layer = MaskLLMLinear(module, twins[rel].weight, cfg.n, cfg.m, cfg.prior)
            setattr(parent, child, layer)
            wrapped.append(layer)
    return wrapped


@torch.no_grad()
def _unwrap(model: nn.Module) -> float:
    """Write each hard mask into its base layer, restore it; fraction of groups changed."""
    changed = total = 0
    for block in get_blocks(model):
        for name, module in list(block.named_modules()):
            if isinstance(module, MaskLLMLinear):
                w = module.base_layer.weight
                before = (w != 0).float()
                w.copy_(module.dense * module.hard_mask())
                diff = (before != (w != 0).float()).reshape(w.shape[0], -1, module.m).any(-1)
                changed += int(diff.sum())
                total += diff.numel()
                w.requires_grad_(True)
                parent_name, _, child = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                setattr(parent, child, module.base_layer)
    return changed / max(total, 1)


def learn_masks(
    model: nn.Module,
    dense: nn.Module,
    data: torch.Tensor,
    cfg: MaskLLMConfig | None = None,
    on_step: object = None,
) -> MaskLLMLog:
    """Learn N:M masks of `model` (weights frozen) to match `dense`; edits `model` in place.

    `model` starts from any N:M mask of the same pattern (its zeros set the prior);
    `dense` holds the weights the masks select from and the teacher distribution.
    `on_step(step, wrapped)` is called after every step (tests check validity there).
    """
    cfg = cfg or MaskLLMConfig()
    log = MaskLLMLog()
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = _wrap(model, dense, cfg)
    opt = torch.optim.AdamW([w.logits for w in wrapped], lr=cfg.lr, weight_decay=0.0)
    dense.eval()
    model.train()
    start = time.perf_counter()
    try:
        for step in tqdm(range(cfg.steps), desc="maskllm", unit="step"):
            elapsed = time.perf_counter() - start
            if cfg.max_seconds and step and elapsed >= cfg.max_seconds:
                break
            frac = step / max(cfg.steps - 1, 1)
            if cfg.max_seconds:
                frac = min(max(frac, elapsed / cfg.max_seconds), 1.0)
            tau = cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** frac
            for w in wrapped:
                w.tau = tau
            ids = data[torch.randint(0, data.shape[0], (cfg.batch_size,), generator=gen)]
            with torch.no_grad():
                target = F.log_softmax(next_token_logits(dense, ids), -1)
            pred = F.log_softmax(next_token_logits(model, ids), -1)
            loss = F.kl_div(pred, target, log_target=True, reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            log.losses.append(loss.item())
            if callable(on_step):
                on_step(step, wrapped)
    finally:
        model.eval()
        log.changed_fraction = _unwrap(model)
        log.seconds = time.perf_counter() - start
    return log
