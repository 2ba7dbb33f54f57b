"""Write compressed checkpoints: block linears and the LM head packed in one format.

See `sparsellm.models.compressed` for the directory layout (which reads it back) and
`sparsellm.formats` for the weight kinds. The export never changes which weights are
zero: sparse kinds store exactly the nonzeros, and symmetric quantization maps 0 to 0.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from sparsellm.errors import SparseLLMError
from sparsellm.export.hf import MANIFEST, write_dir_atomic, write_json_atomic
from sparsellm.formats import DEFAULT_GROUP, Packed, choose_kind, pack
from sparsellm.models.adapters import block_linears, blocks_prefix, get_blocks, weight_matrix
from sparsellm.models.compressed import FORMAT_KEY, PACKED_FORMATS, PACKED_META, WEIGHTS_FILE

# files of the source directory that travel with the weights (activation thresholds)
CARRIED_FILES = ("activation_sparsity.safetensors",)


def pack_model(model: nn.Module, fmt: str, group: int = DEFAULT_GROUP) -> dict[str, Packed]:
    """Every block linear, the LM head and an untied embedding, packed for `fmt`, by
    module name (the kinds `choose_kind` picks per weight)."""
    if fmt not in PACKED_FORMATS:
        raise SparseLLMError(f"unknown format {fmt!r} (known: {', '.join(PACKED_FORMATS)})")
    out: dict[str, Packed] = {}
    prefix = blocks_prefix(model)
    for i, block in enumerate(get_blocks(model)):
        for name, module in block_linears(block).items():
            w = weight_matrix(module).detach()
            out[f"{prefix}.{i}.{name}"] = pack(w, choose_kind(fmt, w), group)
    names = {id(m): n for n, m in model.named_modules()}
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    out[names[id(head)]] = pack(head.weight.detach(), choose_kind(fmt, head.weight, head=True))
    if embed.weight is not head.weight:
        kind = choose_kind(fmt, embed.weight, head=True)
        out[names[id(embed)]] = pack(embed.weight.detach(), kind)
    return out


def write_compressed(
    model: nn.Module,
    tokenizer: Any,
    out: str | os.PathLike,
    fmt: str,
    manifest: dict[str, Any],
    *,
    overwrite: bool = False,
    group: int = DEFAULT_GROUP,
    source_dir: str | os.PathLike | None = None,
) -> tuple[Path, dict[str, Packed]]:
    """Atomically write `model` (plain: activation wrappers removed, their thresholds
    are carried from `source_dir`) as a compressed checkpoint in `fmt`; returns the
    directory and the packed weights."""
    packed = pack_model(model, fmt, group)
    tensors: dict[str, torch.Tensor] = {}
    index: dict[str, Any] = {}
    for name, p in packed.items():
        index[name] = p.meta()
        for part, t in p.tensors().items():
            tensors[f"{name}.weight.{part}"] = t.contiguous()
    packed_keys = {f"{name}.weight" for name in packed}
    head = model.get_output_embeddings().weight
    for key, t in model.state_dict(keep_vars=True).items():
        if key in packed_keys or t is head:  # packed, or the embedding tied to the head
            continue
        tensors[key] = t.detach().float().contiguous()
    config = model.config.to_dict()
    config[FORMAT_KEY] = fmt
    config.pop("quantization_config", None)

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={PACKED_META: json.dumps(index)})
        write_json_atomic(tmp / "config.json", config)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / MANIFEST, manifest)
        for name in CARRIED_FILES:
            if source_dir is not None and (Path(source_dir) / name).is_file():
                shutil.copy2(Path(source_dir) / name, tmp / name)

    return write_dir_atomic(out, overwrite, fill), packed


def dir_bytes(path: str | os.PathLike) -> int:
    """Bytes of every file under `path` but the manifest (which records this number)."""
    files = [f for f in Path(path).rglob("*") if f.is_file() and f.name != MANIFEST]
    return sum(f.stat().st_size for f in files)


def block_linear_bytes_per_param(model: nn.Module, packed: dict[str, Packed]) -> float:
    """Stored bytes per parameter over the block linears only (what decode streams)."""
    prefix = blocks_prefix(model) + "."
    parts = [p for n, p in packed.items() if n.startswith(prefix)]
    params = sum(p.shape[0] * p.shape[1] for p in parts)
    return sum(p.nbytes for p in parts) / params
