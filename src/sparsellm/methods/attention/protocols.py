"""The two attention families as declared interfaces: what a prefill or a KV-cache method
provides so that `sparsellm.integrations.transformers` can run it without knowing it.

An attention method is a frozen config that subclasses `PrefillConfig` (family
``prefill``: it turns one layer's post-RoPE query and key into a block mask) or `KVConfig`
(family ``kv``: hooks that compress or select from a `CompressedCache` around each
attention call), carries its behaviour as these methods and registers itself with
`attention_method`. The integration dispatches on ``config.family`` and calls only what is
declared here, so it imports no concrete method and a new method is one new file.

Methods with an offline step (MInference's per-head patterns, MoA's spans, Double
Sparsity's channels) report it by `needs_calibration` and hand the integration a
`Calibration`: an observer of one forward's attention inputs that then builds the
calibrated config. SpecKV's draft-model scoring is a `DraftScorer` observer the same way.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

import torch

from sparsellm.config import MethodConfig
from sparsellm.errors import SparseLLMError
from sparsellm.methods.attention import patterns as P
from sparsellm.registry import register

if TYPE_CHECKING:
    from sparsellm.methods.attention.cache import CompressedCache

ATTENTION_FAMILIES = ("prefill", "kv")  # the `family` values of attention methods


class AttentionObserver(Protocol):
    """Sees the post-RoPE query and key of every full-attention layer during a forward."""

    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        """Record what this layer's attention inputs say (the forward itself is exact)."""


class Calibration(AttentionObserver, Protocol):
    """What a method learns from one forward over calibration text."""

    def result(self, model: torch.nn.Module) -> AttentionConfig:
        """The calibrated config, once every full-attention layer of `model` was observed."""


class DraftScorer(AttentionObserver, Protocol):
    """Prompt-token scores from a draft model reading the prompt and generating
    `lookahead` tokens greedily (its observed attention decides what the target keeps)."""

    lookahead: int

    def fill(self, cache: CompressedCache) -> None:
        """Put the scores into the target's fresh cache (``cache.shared``)."""


C = TypeVar("C", bound=type["AttentionConfig"])


def attention_method(cls: C) -> C:
    """Class decorator: ``register(cls)`` with the config as its own handler. An attention
    config *is* the method (its family protocol's methods); the integration runs it."""
    return register(cls)(cls)


@dataclass(frozen=True)
class AttentionConfig(MethodConfig, ABC):
    """Common base of both families: parameter checks and the calibration protocol."""

    def __post_init__(self) -> None:
        """Every number is a count, a size or a fraction (never negative); a block or a
        page holds at least one token."""
        numbers = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), int | float)
            and not isinstance(getattr(self, f.name), bool)
        }
        if any(v < 0 for v in numbers.values()) or any(
            numbers.get(k, 1) < 1 for k in ("block", "page")
        ):
            raise SparseLLMError(
                f"{self.name}: parameters must be non-negative, block and page >= 1"
            )

    def needs_calibration(self) -> bool:
        """True while a calibrated table this method runs on is still empty."""
        return False

    def calibration(self, tokens: int) -> Calibration:
        """The observer whose `result` fills that table from `tokens` calibration tokens."""
        raise SparseLLMError(f"{self.name} has nothing to calibrate")


@dataclass(frozen=True)
class PrefillConfig(AttentionConfig):
    """A prefill method: a block mask per layer, computed by the block-sparse kernel for
    unpadded prefills of at least `min_length` tokens (SDPA runs everything else)."""

    family: ClassVar[str] = "prefill"
    if TYPE_CHECKING:  # every prefill method declares these as (its own) dataclass fields
        block: int  # tokens per block of the mask
        min_length: int  # shorter prefills run SDPA unchanged
        tail: int  # the query blocks holding the last `tail` tokens attend everything

    @abstractmethod
    def block_mask(self, query: torch.Tensor, key: torch.Tensor, layer: int) -> torch.Tensor:
        """Bool ``(…, nq_blocks, nk_blocks)`` mask of layer `layer` from its post-RoPE
        ``query (B, Hq, L, D)`` and ``key (B, Hkv, L, D)``; leading dims broadcast to
        ``(B, Hkv)``."""

    def bind(self, config: Any) -> PrefillConfig:
        """This config completed from the model's `config` when a session starts (LongHeads
        reads the rotary base); most methods need nothing from it."""
        return self

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, layer: int
    ) -> torch.Tensor | None:
        """The prefill attention ``(B, Hq, L, D)`` when the method computes it itself
        (LongHeads re-rotates the keys it reads); None: the block-sparse kernel runs
        `prefill_mask`."""
        return None

    def prefill_mask(self, query: torch.Tensor, key: torch.Tensor, layer: int) -> torch.Tensor:
        """The mask the kernel runs: `block_mask` with the ``tail`` query blocks made dense
        (`patterns.dense_tail`), so a question at the end of a long prompt reads all of it."""
        tail = P.tail_blocks(query.shape[2], self.tail, self.block)
        return P.dense_tail(self.block_mask(query, key, layer), tail)


@dataclass(frozen=True)
class KVConfig(AttentionConfig):
    """A KV-cache method: prefill is exact (or a paired prefill method's), then hooks
    compress the layer's `CompressedCache` entry or pick the tokens a decode step reads.
    Every hook defaults to doing nothing, so a method overrides only what it changes."""

    family: ClassVar[str] = "kv"

    def after_prefill(
        self, cache: CompressedCache, layer_idx: int, query: torch.Tensor, scale: float
    ) -> None:
        """Compress layer `layer_idx` right after its prefill (`query`: the prompt's)."""

    def select(
        self, cache: CompressedCache, layer_idx: int, query: torch.Tensor
    ) -> torch.Tensor | None:
        """Token indices ``(B, Hkv, n)`` a decode step's `query` attends, None for all."""
        return None

    def after_step(self, cache: CompressedCache, layer_idx: int, probs: torch.Tensor) -> None:
        """After one decode step, given its attention weights summed per KV head
        ``(B, Hkv, T)`` over the tokens it read."""

    def needs_draft(self) -> bool:
        """True when the cache must first be scored by a draft model (`draft_scorer`)."""
        return False

    def draft_scorer(self, prompt: int) -> DraftScorer:
        """The observer that scores a `prompt`-token prompt on a draft model."""
        raise SparseLLMError(f"{self.name} uses no draft model")
