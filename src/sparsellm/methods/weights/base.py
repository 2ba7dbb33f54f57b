"""Base classes for weight pruners: step config, calibration statistics, pruner.

A pruner is a small object with pure math: given an (out, in) fp32 weight and the
statistics collected for that layer, return the pruned weight. Everything else
(walking the model, hooks, sequential propagation, dtypes, progress) lives in
`sparsellm.methods.weights.apply`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from sparsellm.config import MethodConfig
from sparsellm.errors import SparseLLMError
from sparsellm.methods.weights.masks import Pattern, check_sparsity, make_mask, parse_pattern
from sparsellm.models.shards import spill_tensor


@dataclass(frozen=True)
class WeightPruneConfig(MethodConfig):
    """Keys every weight-pruning recipe step accepts (family ``weights``).

    `allocation: owl` gives each block its own sparsity from its outlier ratio
    (see `sparsellm.methods.weights.allocation`); `allocation: evopress` searches per-layer
    levels by KL to the dense model (`sparsellm.methods.weights.evopress`, ``evo_*`` keys).
    Both keep the global sparsity at the target.

    `sparsity` defaults to 0.5; for an N:M pattern it defaults to N/M and, if given,
    must agree with it. `targets` / `ignore` select block linears by fully qualified
    name: ``"re:REGEX"`` matches with `re.match`, any other string matches the exact
    name or a trailing ``.name`` component (so ``"down_proj"`` selects every down_proj).
    Empty `targets` means every linear projection inside the transformer blocks.
    """

    family: ClassVar[str] = "weights"

    sparsity: float | None = None
    pattern: str = "unstructured"
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    allocation: str = "uniform"  # "owl" | "evopress": per-layer budgets, same global sparsity
    owl_lambda: float = 0.08
    owl_threshold: float = 5.0
    evo_generations: int = 30
    evo_offspring: int = 8
    evo_step: float = 0.05
    evo_levels: int = 3
    evo_state: str | None = None

    def __post_init__(self) -> None:
        parsed = parse_pattern(self.pattern)
        if self.allocation not in ("uniform", "owl", "evopress"):
            raise SparseLLMError(
                f"allocation must be uniform, owl or evopress, got {self.allocation!r}"
            )
        if self.allocation != "uniform" and parsed.is_nm:
            raise SparseLLMError(
                f"{self.allocation} allocates unstructured sparsity; N:M fixes it per group"
            )
        if self.evo_generations < 0 or self.evo_offspring < 1 or not 0 < self.evo_step < 0.5:
            raise SparseLLMError("evo_generations >= 0, evo_offspring >= 1, 0 < evo_step < 0.5")
        if not 0 <= self.owl_lambda < 0.5:
            raise SparseLLMError(f"owl_lambda must be in [0, 0.5), got {self.owl_lambda}")
        if self.sparsity is not None:
            check_sparsity(self.sparsity)
            if parsed.is_nm and abs(self.sparsity - parsed.sparsity) > 1e-9:
                raise SparseLLMError(
                    f"pattern {parsed} implies sparsity {parsed.sparsity:g}, "
                    f"but sparsity {self.sparsity:g} was asked for"
                )
        for key in ("targets", "ignore"):
            value = getattr(self, key)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise SparseLLMError(f"{key} must be a list of strings, got {value!r}")
            object.__setattr__(self, key, tuple(value))

    @property
    def parsed_pattern(self) -> Pattern:
        return parse_pattern(self.pattern)

    @property
    def target_sparsity(self) -> float:
        implied = self.parsed_pattern.sparsity
        if implied is not None:
            return implied
        return 0.5 if self.sparsity is None else float(self.sparsity)


class Stats:
    """Per-layer calibration statistics, accumulated in fp32 from (tokens, in) inputs."""

    def __init__(self, in_features: int) -> None:
        self.in_features = in_features
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        raise NotImplementedError


class RowNormSq(Stats):
    """Σ_t x_tj² per input channel j: Wanda's ‖X_j‖₂² (squared column norm of the inputs).

    Summed per calibration window in fp32 and across windows in fp64 (`window_sums`), so
    the value does not depend on how windows are batched."""

    def __init__(self, in_features: int) -> None:
        super().__init__(in_features)
        self.sum = torch.zeros(in_features, dtype=torch.float64)
        self.windows = 0

    def update(self, x: torch.Tensor) -> None:
        windows = as_windows(x, self.in_features)
        self.sum += windows.square().sum(1).double().sum(0)
        self.tokens += windows.shape[0] * windows.shape[1]
        self.windows += windows.shape[0]

    @property
    def value(self) -> torch.Tensor:
        return self.sum.float()

    @property
    def per_window(self) -> torch.Tensor:
        """Σ x² divided by the number of calibration windows (GBLM's scale, see gblm.py)."""
        return (self.sum / max(self.windows, 1)).float()


class InputMoments(Stats):
    """Per input channel Σx and Σx²: mean, (biased) variance and Wanda's squared norm."""

    def __init__(self, in_features: int) -> None:
        super().__init__(in_features)
        self.sum = torch.zeros(in_features, dtype=torch.float64)
        self.sum_sq = torch.zeros(in_features, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.in_features).float()
        self.sum += x.sum(0).double()
        self.sum_sq += x.square().sum(0).double()
        self.tokens += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return (self.sum / max(self.tokens, 1)).float()

    @property
    def var(self) -> torch.Tensor:
        mean = self.sum / max(self.tokens, 1)
        return (self.sum_sq / max(self.tokens, 1) - mean.square()).clamp_min(0).float()

    @property
    def norm_sq(self) -> torch.Tensor:
        return self.sum_sq.float()


class Hessian(Stats):
    """XᵀX / tokens: the layer-wise reconstruction Hessian (up to the factor 2).

    Reference math, not batch numerics: each calibration window's XᵢᵀXᵢ is an fp32 GEMM
    over its own tokens (1024 rows at a time: a whole (d, d) fp32 partial was half the
    sum's size again, 321 MB on a 1.5B model's down_proj), and the windows are summed in
    fp64. A single fp32 running sum
    made the Hessian — and through SparseGPT's near-tied mask choices, perplexity — move
    with the calibration batch size; with per-window partials the sum is the same for any
    batching, and a full fp64 GEMM (twice the time) is not needed.
    """

    def __init__(self, in_features: int, spill: Path | None = None) -> None:
        super().__init__(in_features)
        self.spill = spill
        self.sum: torch.Tensor | None = self._zeros(torch.float64)
        self._value: torch.Tensor | None = None

    def _zeros(self, dtype: torch.dtype) -> torch.Tensor:
        """(d, d) zeros in RAM, or with `spill` in an unlinked file in that directory:
        a streamed run under a memory cap keeps the largest statistics (a 1.5B model's
        down_proj: 642 MB fp64 + 321 MB fp32) where the OS can page them out."""
        shape = (self.in_features, self.in_features)
        if self.spill is None:
            return torch.zeros(shape, dtype=dtype)
        return spill_tensor(self.spill, shape, dtype)

    def update(self, x: torch.Tensor) -> None:
        if self.sum is None:
            raise RuntimeError("Hessian.update after .value: the statistics are final")
        windows = as_windows(x, self.in_features)
        for w in windows:  # (1024, d) fp32 partials: no (d, d) buffer besides the sum
            for r in range(0, self.in_features, 1024):
                self.sum[r : r + 1024] += w[:, r : r + 1024].t() @ w
        self.tokens += windows.shape[0] * windows.shape[1]

    @property
    def value(self) -> torch.Tensor:
        """The fp32 Hessian; computed once, after which the fp64 sum is freed (a
        down_proj's is 642 MB on a 1.5B model: half a streamed run's peak)."""
        if self._value is None:
            assert self.sum is not None
            mean = self.sum.div_(max(self.tokens, 1))  # in place: no fp64 temporary
            self._value = mean.float() if self.spill is None else self._zeros(torch.float32)
            if self.spill is not None:
                self._value.copy_(mean)  # the same fp64 -> fp32 rounding as .float()
            self.sum = None
        return self._value


def as_windows(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inputs as fp32 (windows, tokens, features): a (batch, seq, d) activation keeps its
    windows; anything flatter is one window."""
    if x.dim() >= 3:
        return x.reshape(-1, x.shape[-2], in_features).float()
    return x.reshape(1, -1, in_features).float()


@dataclass(frozen=True)
class LayerContext:
    """Per-layer inputs a method may need besides its statistics.

    `sparsity` overrides the step's target (non-uniform allocation); `dense` is the
    layer's weight before the recipe started (methods with `needs_dense`); `grad` the
    layer's gradient norms on calibration data (methods with `needs_gradients`).
    """

    sparsity: float | None = None
    dense: torch.Tensor | None = None
    grad: torch.Tensor | None = None


class WeightPruner:
    """A weight-pruning method. Subclasses set `stats` and implement `score` or `prune`."""

    stats: ClassVar[type[Stats] | None] = None  # None: needs no calibration data
    per: ClassVar[str] = "layer"  # comparison group for unstructured masks
    needs_dense: ClassVar[bool] = False  # True: `prune` gets the weights before any step
    needs_gradients: ClassVar[bool] = False  # True: `prune` gets per-weight gradient norms

    def __init__(self, config: WeightPruneConfig) -> None:
        self.config = config

    def sparsity(self, ctx: LayerContext | None) -> float:
        """This layer's target: the allocation's budget if any, else the step's."""
        if ctx is not None and ctx.sparsity is not None:
            return ctx.sparsity
        return self.config.target_sparsity

    def score(self, weight: torch.Tensor, stats: Stats | None) -> torch.Tensor:
        """Importance of every weight; the lowest are pruned."""
        raise NotImplementedError

    def prune(
        self, weight: torch.Tensor, stats: Stats | None, ctx: LayerContext | None = None
    ) -> torch.Tensor:
        """Pruned copy of the fp32 (out, in) `weight`; score-and-mask by default.

        `ctx` carries what the framework knows about this layer beyond its statistics.
        """
        cfg = self.config
        target = self.sparsity(ctx)
        mask = make_mask(self.score(weight, stats), target, cfg.parsed_pattern, self.per)
        return weight.masked_fill(mask, 0.0)
