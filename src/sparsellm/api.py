"""The public verbs: load_model, calibration, sparsify, evaluate, save, load."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparsellm.activation.io import load_activation_state
from sparsellm.data.corpora import resolve_corpus, token_windows
from sparsellm.eval.perplexity import perplexity
from sparsellm.export.hf import read_manifest
from sparsellm.export.hf import save as _save
from sparsellm.models.load import LoadedModel, load_model
from sparsellm.recipe import Step, parse_recipe
from sparsellm.weights.apply import apply_step, check_finite

__all__ = [
    "SparsifyReport",
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
    """What `sparsify` did: resolved steps, per-layer sparsity and wall time."""

    steps: list[dict[str, Any]]
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def sparsity(self) -> float:
        """Measured sparsity over all pruned layers, weighted by their size."""
        total = sum(v["numel"] for v in self.layers.values())
        zeros = sum(v["numel"] * v["sparsity"] for v in self.layers.values())
        return zeros / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "prune_seconds": self.seconds,
            "measured_sparsity": self.sparsity,
            "layers": self.layers,
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
    """Apply every step of `recipe` in order, in place; `calib` is (n, seqlen) token ids."""
    steps: list[Step] = parse_recipe(recipe)
    check_finite(model)
    report = SparsifyReport(steps=[s.to_dict() for s in steps])
    start = time.perf_counter()
    model.eval()
    dense = _dense_snapshot(model) if any(_needs_dense(s) for s in steps[1:]) else None
    for step in steps:
        layers = apply_step(
            model,
            step,
            calib,
            batch_size=batch_size,
            calib_dtype=calib_dtype,
            dense_weights=dense,
        )
        for fqn, entry in layers.items():
            entry["numel"] = model.get_submodule(fqn).weight.numel()
            entry["method"] = step.method
            report.layers[fqn] = entry
    report.seconds = time.perf_counter() - start
    return report


def _needs_dense(step: Step) -> bool:
    from sparsellm.registry import lookup

    return lookup(step.method)[1].needs_dense


def _dense_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fp32 copies of every block linear's weight (for steps that grow weights back)."""
    from sparsellm.models.adapters import block_linears, blocks_prefix, get_blocks, weight_matrix

    prefix = blocks_prefix(model)
    return {
        f"{prefix}.{i}.{rel}": weight_matrix(m).detach().float().clone()
        for i, block in enumerate(get_blocks(model))
        for rel, m in block_linears(block).items()
    }


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
    manifest: dict[str, Any] | None = None,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Atomically save a plain HF checkpoint plus `sparsellm_manifest.json`."""
    manifest = dict(manifest or {})
    manifest.setdefault("versions", versions())
    return _save(model, tokenizer, out, manifest, overwrite=overwrite, extra_files=extra_files)


def load(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a directory written by `save` (or any HF dir); `.info` carries its manifest.

    Calibrated activation sparsity saved beside the weights is re-applied (vanilla
    `transformers` loads the same directory as the plain dense model). Directories with
    per-layer widths (structured pruning) are rebuilt block by block.
    """
    from sparsellm.structured.io import has_layer_shapes
    from sparsellm.structured.io import load as load_structured

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
