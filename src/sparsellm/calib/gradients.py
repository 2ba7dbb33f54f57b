"""Per-weight gradient magnitudes of the language-modelling loss on calibration data.

GBLM-Pruner needs, for every pruned weight, the ℓ2 norm over calibration samples of
its (scaled) gradient: G = sqrt(Σ_n (s · ∂L_n/∂W)²), one backward per sample on the
dense model. Only the selected weights get gradients (the rest are frozen for the
pass, which keeps memory at one gradient per pruned weight); every flag is restored.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from sparsellm.models.adapters import grad_matrix


@contextmanager
def _only_these_trainable(model: nn.Module, modules: list[nn.Module]) -> Iterator[None]:
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for m in modules:
            m.weight.requires_grad_(True)
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None


def gradient_l2(
    model: nn.Module, calib: torch.Tensor, modules: dict[str, nn.Module], scale: float = 100.0
) -> dict[str, torch.Tensor]:
    """fqn -> sqrt(Σ_samples (scale · grad)²) in (out, in) layout, fp32."""
    acc: dict[str, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    with _only_these_trainable(model, list(modules.values())):
        for ids in tqdm(calib.split(1), desc="gradients", unit="sample", leave=False):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            for fqn, m in modules.items():
                g = grad_matrix(m)
                if g is None:
                    continue
                sq = (g.detach().float() * scale).square()
                acc[fqn] = sq if fqn not in acc else acc[fqn] + sq
                m.weight.grad = None
    model.train(was_training)
    return {fqn: v.sqrt() for fqn, v in acc.items()}
