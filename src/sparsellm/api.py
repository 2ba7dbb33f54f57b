"""The public verbs: load_model, calibration, sparsify, evaluate, save, load."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparsellm.config import MethodConfig
from sparsellm.data.corpora import resolve_corpus, token_windows
from sparsellm.errors import SparseLLMError
from sparsellm.eval.perplexity import perplexity
from sparsellm.export.hf import read_manifest
from sparsellm.export.hf import save as _save
from sparsellm.methods.activation.io import load_activation_state
from sparsellm.methods.weights.apply import apply_step, check_finite
from sparsellm.models.load import LoadedModel, load_model
from sparsellm.recipe import Recipe, parse_recipe
from sparsellm.result import Result

__all__ = [
    "SparsifyReport",
    "attention",
    "calibration",
    "evaluate",
    "load",
    "load_model",
    "save",
    "sparsify",
    "versions",
]


@dataclass
class SparsifyReport:
    """What `sparsify` did: the resolved recipe, per-layer weight sparsity, per-step
    details (a structured method's report, an activation method's thresholds) and time."""

    recipe: Recipe
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    details: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def sparsity(self) -> float:
        """Measured weight sparsity over all pruned layers, weighted by their size."""
        total = sum(v["numel"] for v in self.layers.values())
        zeros = sum(v["numel"] * v["sparsity"] for v in self.layers.values())
        return zeros / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe.to_dict(),
            "prune_seconds": self.seconds,
            "measured_sparsity": self.sparsity,
            "layers": self.layers,
            "details": self.details,
        }


def calibration(
    tokenizer: Any, source: str = "c4", nsamples: int = 32, seqlen: int = 512
) -> torch.Tensor:
    """The first `nsamples` windows of `seqlen` tokens of `source` (see data.corpora)."""
    return token_windows(tokenizer, resolve_corpus(source), nsamples, seqlen)


def sparsify(
    model: torch.nn.Module,
    recipe: Any,
    calib: torch.Tensor | None = None,
    *,
    batch_size: int = 8,
    calib_dtype: torch.dtype | None = None,
) -> SparsifyReport:
    """Apply every step of `recipe` to `model` in place, in order; `calib` is (n, seqlen)
    token ids.

    `recipe` is anything `parse_recipe` reads: a `Recipe`, a list of configs / step
    mappings / spec strings, or ``{steps: [...], attention: ...}``. Weight, structured and
    activation steps are applied here; the recipe's attention methods act only inside
    `attention(model, recipe)`. Each step sees the model the previous steps left (a
    weight step's calibration runs through already-sparse blocks).
    """
    from sparsellm.registry import handler

    recipe = parse_recipe(recipe)
    check_finite(model)
    report = SparsifyReport(recipe=recipe)
    start = time.perf_counter()
    model.eval()
    needs_dense = any(s.family == "weights" and handler(s).needs_dense for s in recipe.steps[1:])
    dense = _dense_snapshot(model) if needs_dense else None
    for step in recipe.steps:
        report.details.append(
            _apply(model, step, calib, batch_size, calib_dtype, dense, report.layers)
        )
    report.seconds = time.perf_counter() - start
    return report


def _apply(
    model: torch.nn.Module,
    step: MethodConfig,
    calib: torch.Tensor | None,
    batch_size: int,
    calib_dtype: torch.dtype | None,
    dense: dict[str, torch.Tensor] | None,
    layers: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Run one step through its family's framework; weight steps fill `layers`."""
    if step.family == "weights":
        done = apply_step(
            model,
            step,
            calib,
            batch_size=batch_size,
            calib_dtype=calib_dtype,
            dense_weights=dense,
        )
        for fqn, entry in done.items():
            entry["numel"] = model.get_submodule(fqn).weight.numel()
            entry["method"] = step.name
            layers[fqn] = entry
        return {}
    if step.family == "structured":
        from sparsellm.methods.structured import apply_structured

        return apply_structured(model, step, calib, batch_size=min(batch_size, 4))
    from sparsellm.methods.activation.apply import sparsify_activations

    if calib is None:
        raise SparseLLMError(f"activation method {step.name!r} needs calibration data")
    return sparsify_activations(model, calib, step, batch_size=min(batch_size, 4))


def _dense_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fp32 copies of every block linear's weight (for steps that grow weights back)."""
    from sparsellm.models.adapters import block_linears, blocks_prefix, get_blocks, weight_matrix

    prefix = blocks_prefix(model)
    return {
        f"{prefix}.{i}.{rel}": weight_matrix(m).detach().float().clone()
        for i, block in enumerate(get_blocks(model))
        for rel, m in block_linears(block).items()
    }


def attention(
    model: torch.nn.Module,
    recipe: Any,
    tokenizer: Any = None,
    *,
    calib: str = "c4",
    seqlen: int = 4096,
) -> contextlib.AbstractContextManager[Any]:
    """Context manager running `model` with a recipe's sparse attention (or one spec).

    `recipe` is a `Recipe`, a recipe mapping, an ``attention:`` value (``{prefill, kv}``)
    or a spec string. Inside the block the prefill method computes every long prefill,
    and a KV method compresses caches made by the yielded session's ``new_cache()``.
    Methods with calibrated tables (MInference, MoA, Double Sparsity) are calibrated
    first on one window of `calib` (`seqlen` tokens, capped by the model's window), which
    needs `tokenizer`. The model's own attention is restored on exit, even on error.
    """
    from sparsellm.integrations.transformers import calibrate, sparse_attention
    from sparsellm.models.adapters import context_window
    from sparsellm.recipe import parse_attention

    if (
        isinstance(recipe, dict) and "steps" not in recipe and "attention" not in recipe
    ) or isinstance(recipe, str | MethodConfig):
        spec = parse_attention(recipe)
    else:
        spec = parse_recipe(recipe).attention
    if not spec:
        return contextlib.nullcontext()

    def ready(cfg: MethodConfig | None) -> MethodConfig | None:
        """`cfg`, calibrated first if it has a calibrated table to fill."""
        if cfg is None or not cfg.needs_calibration():
            return cfg
        if tokenizer is None:
            raise SparseLLMError(f"{cfg.name} calibrates on text first: pass a tokenizer")
        n = min(seqlen, context_window(model) or seqlen)
        return calibrate(model, token_windows(tokenizer, resolve_corpus(calib), 1, n), cfg)

    if spec.kv is None:
        return sparse_attention(model, ready(spec.prefill))
    return sparse_attention(model, ready(spec.kv), prefill=ready(spec.prefill))


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    source: str = "wiki",
    windows: int = 32,
    seqlen: int = 512,
    batch_size: int = 4,
    desc: str = "perplexity",
) -> dict[str, Any]:
    """Perplexity of `model` on the first `windows` windows of `source`."""
    corpus = resolve_corpus(source)
    ids = token_windows(tokenizer, corpus, windows, seqlen)
    result = perplexity(model, ids, batch_size=batch_size, desc=desc)
    result.update({"data": corpus.describe(), "seqlen": seqlen})
    return result


def save(
    model: torch.nn.Module,
    tokenizer: Any,
    out: str | os.PathLike,
    manifest: Result | dict[str, Any] | None = None,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Atomically save a plain HF checkpoint plus `sparsellm_manifest.json`.

    A model with calibrated activation sparsity is saved unwrapped (plain `transformers`
    loads the dense weights) with its thresholds beside it, which `load` re-applies; the
    activation config comes from the manifest's recipe. A `Result` is stored as it is
    (its provenance already holds the versions); a plain dict gains a ``versions`` key.
    """
    from sparsellm.methods.activation.io import save_with_activations
    from sparsellm.methods.activation.modules import wrapped_modules

    if isinstance(manifest, Result):
        manifest = manifest.to_dict()
    else:
        manifest = dict(manifest or {})
        manifest.setdefault("versions", versions())
    if next(wrapped_modules(model), None) is None:
        return _save(model, tokenizer, out, manifest, overwrite, extra_files=extra_files)
    steps = [s for s in parse_recipe_steps(manifest) if s.family == "activation"]
    if not steps:
        raise SparseLLMError(
            "the model has activation sparsity but the manifest's recipe has no activation "
            "step: pass the Result (or a manifest with its 'recipe') of the run"
        )
    return save_with_activations(model, tokenizer, out, manifest, steps[-1], overwrite, extra_files)


def parse_recipe_steps(manifest: dict[str, Any]) -> tuple[MethodConfig, ...]:
    """The steps of a manifest's stored recipe (none when it has no recipe)."""
    raw = manifest.get("recipe")
    return parse_recipe(raw).steps if raw else ()


def load(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a directory written by `save` (or any HF dir); `.info` carries its manifest.

    Calibrated activation sparsity saved beside the weights is re-applied (vanilla
    `transformers` loads the same directory as the plain dense model). Directories with
    per-layer widths (structured pruning) are rebuilt block by block.
    """
    from sparsellm.methods.structured.io import has_layer_shapes
    from sparsellm.methods.structured.io import load as load_structured

    loaded = load_structured(path, dtype) if has_layer_shapes(path) else load_model(path, dtype)
    loaded.info["manifest"] = read_manifest(path)
    if Path(path).is_dir():
        loaded.info["activation"] = load_activation_state(loaded.model, path)
    return loaded


def versions() -> dict[str, str]:
    """Versions that matter for reproducing a number."""
    import transformers

    from sparsellm import __version__

    return {
        "sparsellm": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": str(torch.get_num_threads()),
    }
