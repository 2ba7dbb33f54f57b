"""Compress-then-Prompt (Xu et al., 2023): a learned soft prompt for the sparse model.

The sparse model's weights stay as they are; `n_tokens` learned input embeddings are
prepended to every input, trained so that the prompted sparse model's next-token
distribution matches the dense model's on the *unprompted* input (KL per token). At
evaluation the wrapper hides the prompt: it takes the usual `input_ids`, returns
logits for the user's positions only (and honours `logits_to_keep`), so perplexity,
KL and the task scorers measure it unchanged. The prompt is saved as
``soft_prompt.safetensors`` next to the model; `PromptedLM.from_pretrained` loads both.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from sparsellm.errors import SparseLLMError

PROMPT_FILE = "soft_prompt.safetensors"


class PromptedLM(nn.Module):
    """A causal LM with a learned prefix of input embeddings, invisible to callers."""

    def __init__(self, model: nn.Module, n_tokens: int = 16, init_ids: torch.Tensor | None = None):
        super().__init__()
        self.model = model
        self.config = model.config
        emb = model.get_input_embeddings()
        if init_ids is None:  # start from real token embeddings (a stable initialisation)
            init_ids = torch.arange(n_tokens) % emb.num_embeddings
        self.prompt = nn.Parameter(emb.weight[init_ids].detach().clone())

    @property
    def n_tokens(self) -> int:
        return self.prompt.shape[0]

    def forward(
        self,
        input_ids: torch.Tensor,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> SimpleNamespace:
        kwargs.pop("attention_mask", None)  # callers here pass right-padded, unmasked batches
        embeds = self.model.get_input_embeddings()(input_ids)
        prefix = self.prompt.to(embeds.dtype).expand(input_ids.shape[0], -1, -1)
        out = self.model(inputs_embeds=torch.cat([prefix, embeds], 1), **kwargs)
        logits = out.logits[:, self.n_tokens :]
        if isinstance(logits_to_keep, torch.Tensor):
            logits = logits[:, logits_to_keep]
        elif logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits)

    def save_prompt(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / PROMPT_FILE
        save_file({"prompt": self.prompt.detach().contiguous()}, str(path))
        return path

    @classmethod
    def attach(cls, model: nn.Module, directory: str | os.PathLike) -> PromptedLM:
        """Wrap `model` with the prompt saved in `directory`."""
        path = Path(directory) / PROMPT_FILE
        if not path.is_file():
            raise SparseLLMError(f"{directory} has no {PROMPT_FILE}")
        prompt = load_file(str(path))["prompt"]
        wrapped = cls(model, prompt.shape[0])
        with torch.no_grad():
            wrapped.prompt.copy_(prompt)
        return wrapped


def train_prompt(
    prompted: PromptedLM,
    teacher: nn.Module,
    data: torch.Tensor,
    steps: int = 100,
    lr: float = 1e-3,
    batch_size: int = 4,
    seed: int = 0,
    max_seconds: float | None = None,
) -> dict[str, Any]:
    """Fit the prompt by KL(teacher ‖ prompted student) per token; only the prompt trains.

    `max_seconds` stops training early once that much wall time is spent (at least one
    step runs), so a benchmark can give every recovery variant the same budget.
    """
    for p in prompted.model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam([prompted.prompt], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    start = time.perf_counter()
    for step in tqdm(range(steps), desc="soft prompt", unit="step"):
        if max_seconds and step and time.perf_counter() - start >= max_seconds:
            break
        ids = data[torch.randint(0, data.shape[0], (batch_size,), generator=gen)]
        with torch.no_grad():
            target = F.log_softmax(teacher(input_ids=ids, use_cache=False).logits.float(), -1)
        pred = F.log_softmax(prompted(input_ids=ids, use_cache=False).logits.float(), -1)
        loss = F.kl_div(
            pred.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean"
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    for p in prompted.model.parameters():
        p.requires_grad_(True)
    k = max(len(losses) // 10, 1)
    return {
        "steps": len(losses),
        "n_tokens": prompted.n_tokens,
        "first_loss": sum(losses[:k]) / k,
        "last_loss": sum(losses[-k:]) / k,
        "seconds": time.perf_counter() - start,
    }
