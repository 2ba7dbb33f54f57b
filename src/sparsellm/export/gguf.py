"""Write a GGUF (Q8_0) of a model's current weights, so llama.cpp and Ollama run it.

Why a template: a GGUF carries the tokenizer and architecture metadata llama.cpp needs,
and every model we ship came from a GGUF. We copy the template's metadata and write
each tensor from the model's own weights (pruned, recovered, ...) under the template's
name and shape, quantized to Q8_0 with the `gguf` package (2-D) or as F32 (norms). A
model whose shapes differ from the template's (a shrunk one) is refused.

Two conventions differ between transformers and llama.cpp and are undone here (the
exact inverses of what transformers applies when it reads a GGUF):
- llama: q and k rows are permuted for llama.cpp's interleaved rotary;
- gemma3: RMSNorm weights are stored as 1 + w.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sparsellm.errors import SparseLLMError

NORM_OFFSET = {"gemma3": 1.0}
ROPE_PERMUTED = {"llama"}
_SKIP_KEYS = ("GGUF.", "general.architecture", "general.file_type")


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half rows -> llama.cpp's interleaved pairs (per head: rows [a0..a(d/2),
    b0..] become [a0, b0, a1, b1, ...])."""
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _copy_metadata(reader: Any, writer: Any) -> None:
    import gguf

    for key, field in reader.fields.items():
        if key.startswith(_SKIP_KEYS):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)


def write_gguf_q8_0(model: nn.Module, template: str | os.PathLike, out_file: Path) -> int:
    """Write `model` as a Q8_0 GGUF at `out_file` using `template`'s metadata; returns
    the number of tensors written."""
    import gguf

    reader = gguf.GGUFReader(str(template))
    arch = str(reader.fields["general.architecture"].contents())
    arch_enum = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
    if arch_enum is None:
        raise SparseLLMError(f"the gguf package does not know architecture {arch!r}")
    cfg = model.config
    tmap = gguf.get_tensor_name_map(arch_enum, cfg.num_hidden_layers)
    ours: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        base, _, suffix = name.rpartition(".")
        mapped = tmap.get_name(base)
        if mapped is not None:
            ours[f"{mapped}.{suffix}"] = t.detach().float()
    writer = gguf.GGUFWriter(str(out_file), arch)
    _copy_metadata(reader, writer)
    written = 0
    for info in reader.tensors:
        w = ours.get(info.name)
        if w is None and info.name == "output.weight":  # tied head: the embedding
            w = ours.get("token_embd.weight")
        if w is None:
            raise SparseLLMError(f"the model has no tensor for the template's {info.name}")
        shape = tuple(int(d) for d in reversed(info.shape.tolist()))
        if tuple(w.shape) != shape:
            raise SparseLLMError(
                f"{info.name}: the model's shape {tuple(w.shape)} differs from the template's "
                f"{shape} (GGUF export needs the source's shapes; shrunk models are not supported)"
            )
        if w.dim() == 1:
            if any(info.name.endswith(s) for s in ("norm.weight",)):
                w = w + NORM_OFFSET.get(arch, 0.0)
            writer.add_tensor(info.name, w.numpy().astype(np.float32))
        else:
            if arch in ROPE_PERMUTED and info.name.endswith(("attn_q.weight", "attn_k.weight")):
                heads = cfg.num_attention_heads
                if info.name.endswith("attn_k.weight"):
                    heads = cfg.num_key_value_heads
                w = _permute(w, heads)
            q = gguf.quants.quantize(w.numpy().astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(info.name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        written += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written
