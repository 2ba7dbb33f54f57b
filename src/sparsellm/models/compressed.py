"""Read the compressed checkpoints `sparsellm export` writes.

A compressed directory is a transformers checkpoint directory (config.json, tokenizer,
generation config) whose `config.json` names its format under ``sparsellm_format``
(a whitelisted string, never code) and whose `model.safetensors` holds each packed
weight as parts ``NAME.weight.values``, ``.scale``, ``.mask``, ``.offsets``, with the
layout of every packed weight (kind, shape, group) as JSON in the safetensors metadata.
Never a pickle. Everything else (norms, biases, an untied embedding in int8 formats is
packed too) is stored as plain tensors.

`load_compressed` rebuilds a plain transformers model with the weights dequantized, so
every command (eval, prune, report) reads these directories; the packed weights travel
along in ``info["packed"]`` for the decode runtime, which runs them as stored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from sparsellm.errors import SparseLLMError
from sparsellm.formats import KINDS, Packed, unpack

FORMAT_KEY = "sparsellm_format"
WEIGHTS_FILE = "model.safetensors"
PACKED_META = "sparsellm.packed"
PACKED_FORMATS = ("fp32", "bf16", "int8", "int4", "sparse-bf16", "sparse-int8", "sparse-int4")


def compressed_format(path: str | os.PathLike) -> str | None:
    """The format a directory's config.json declares, or None for a plain checkpoint."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    try:
        fmt = json.loads(config.read_text(encoding="utf-8")).get(FORMAT_KEY)
    except (json.JSONDecodeError, AttributeError):
        raise SparseLLMError(f"{config} is not valid JSON") from None
    if fmt is not None and fmt not in PACKED_FORMATS:
        raise SparseLLMError(
            f"{config}: unknown {FORMAT_KEY} {fmt!r} (known: {', '.join(PACKED_FORMATS)})"
        )
    return fmt


def read_packed(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Packed]]:
    """(plain tensors, packed weights by module name) of a compressed directory; every
    packed weight is validated, so a truncated or corrupted file fails here, in one line."""
    file = Path(path) / WEIGHTS_FILE
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as exc:
        first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise SparseLLMError(f"{file} is unreadable (truncated or corrupt?): {first}") from None
    try:
        index = json.loads(meta[PACKED_META])
    except (KeyError, json.JSONDecodeError):
        raise SparseLLMError(f"{file} has no valid '{PACKED_META}' index") from None
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in index}
    plain: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():  # NAME.weight.PART belongs to packed weight NAME
        name, _, part = key.rpartition(".weight.")
        if name in parts:
            parts[name][part] = t
        else:
            plain[key] = t
    packed: dict[str, Packed] = {}
    for name, layout in index.items():
        if not isinstance(layout, dict) or layout.get("kind") not in KINDS:
            raise SparseLLMError(f"{file}: bad layout for {name}: {layout!r}")
        packed[name] = Packed.from_parts(layout, parts[name])
    return plain, packed


def load_compressed(path: str | os.PathLike, dtype: torch.dtype) -> tuple[Any, dict[str, Packed]]:
    """A transformers model with the dequantized weights of `path`, and its packed weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    plain, packed = read_packed(path)
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {k: v.to(dtype) for k, v in plain.items()}
    for name, p in packed.items():
        state[f"{name}.weight"] = unpack(p).to(dtype)
    result = model.load_state_dict(state, strict=False)
    tied = {
        n
        for n, t in model.state_dict(keep_vars=True).items()
        if t is model.get_output_embeddings().weight
    }
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise SparseLLMError(
            f"{path} does not match its config: missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )
    return model.eval(), packed
