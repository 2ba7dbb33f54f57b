"""Save and restore calibrated activation sparsity next to a plain HF checkpoint.

The model itself is saved unwrapped (vanilla `transformers` loads it as the dense
model); the wrappers' buffers go to one `activation_sparsity.safetensors` whose
metadata says which module each entry wraps, so `sparsellm.load` re-applies them.
Never a pickle. The metadata also keeps the config (`ActivationConfig.to_dict()`, whose
``method`` key names the method, as the files written before method configs did); it
is returned as stored, not parsed, since only the tensors are needed to re-apply.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from torch import nn

from sparsellm.errors import SparseLLMError
from sparsellm.export.hf import save
from sparsellm.methods.activation.base import ActivationConfig
from sparsellm.methods.activation.modules import (
    ActSparseLinear,
    TemporalDeltaLinear,
    ThresholdedActivation,
    replace_module,
    wrapped_modules,
)

STATE_FILE = "activation_sparsity.safetensors"


def activation_state(model: nn.Module, config: ActivationConfig) -> tuple[dict, dict[str, str]]:
    """Tensors and safetensors metadata describing every wrapper in `model` (calibrated
    with `config`)."""
    tensors: dict[str, torch.Tensor] = {}
    kinds: dict[str, str] = {}
    for name, mod in wrapped_modules(model):
        kind = (
            "linear"
            if isinstance(mod, ActSparseLinear)
            else "delta"
            if isinstance(mod, TemporalDeltaLinear)
            else "gate"
        )
        kinds[name] = kind
        for key, buf in mod.named_buffers(recurse=False):
            tensors[f"{name}.{key}"] = buf.detach().contiguous().clone()
        if kind == "gate":
            tensors[f"{name}.weights_per_channel"] = torch.tensor(mod.weights_per_channel)
    meta = {"format": "1", "modules": json.dumps(kinds), "config": json.dumps(config.to_dict())}
    return tensors, meta


@contextmanager
def unwrapped(model: nn.Module) -> Iterator[None]:
    """Temporarily put the original modules back (to save a loadable dense checkpoint)."""
    wrappers = list(wrapped_modules(model))
    try:
        for name, mod in wrappers:
            replace_module(model, name, mod.base_layer)
        yield
    finally:
        for name, mod in wrappers:
            replace_module(model, name, mod)


def save_with_activations(
    model: nn.Module,
    tokenizer: Any,
    out: str | Path,
    manifest: dict[str, Any],
    config: ActivationConfig,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Atomically save the dense checkpoint plus the activation-sparsity state."""
    state = activation_state(model, config)  # read the wrappers before unwrapping
    with unwrapped(model):
        return save(model, tokenizer, out, manifest, overwrite, extra_files, {STATE_FILE: state})


def load_activation_state(model: nn.Module, path: str | Path) -> dict[str, Any] | None:
    """Re-wrap `model` from `path`/activation_sparsity.safetensors; returns the stored
    config mapping (``{"method": ..., ...}``), or None if there is no such file."""
    file = Path(path) / STATE_FILE
    if not file.is_file():
        return None
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(file))
        kinds = json.loads(meta["modules"])
        config = json.loads(meta["config"])
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as exc:
        raise SparseLLMError(f"{file} is corrupt or not ours: {exc}") from None
    for name, kind in kinds.items():
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise SparseLLMError(f"{file} names {name!r}, which this model lacks") from None
        t = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
        if kind == "linear":
            low = (t["lr_a"], t["lr_b"]) if t["lr_b"].numel() else None
            col = t["col_norm"] if t["col_norm"].numel() else None
            wrapper = ActSparseLinear(base, float(t["threshold"]), col, low)
        elif kind == "delta":
            wrapper = TemporalDeltaLinear(base, float(t["threshold"]))
        elif kind == "gate":
            wrapper = ThresholdedActivation(
                base, float(t["threshold"]), int(t["weights_per_channel"])
            )
        else:
            raise SparseLLMError(f"{file}: unknown wrapper kind {kind!r} for {name}")
        replace_module(model, name, wrapper)
    return config
