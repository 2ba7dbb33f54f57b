"""De-quantise a GGUF file into fp32 safetensors shards one tensor at a time.

transformers' GGUF loading de-quantises every tensor into one state dict and then builds
the model from it: a 1.5B Q4_K_M file needed two fp32 copies of the model (~14 GB) to be
converted, and a 70B one could never be. Here each tensor is de-quantised, put through
transformers' own per-architecture fix-ups (`TensorProcessor`: llama's q/k permutation
undone, Gemma's norms, experts split...) and name map, and written to the current shard
(flushed at `SHARD_BYTES`), so the conversion holds the largest tensor and one shard at
most. The result is a plain checkpoint that streamed pruning then reads block by block.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import init_empty_weights
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PretrainedConfig

from sparsellm.errors import SparseLLMError
from sparsellm.models.shards import INDEX, SINGLE, return_freed_memory, write_shard

SHARD_BYTES = 512 << 20


class _Shards:
    """Tensors collected into numbered shards of at most `limit` bytes (a larger tensor
    gets a shard of its own), renamed ``model-K-of-N`` once N is known."""

    def __init__(self, out: Path, limit: int) -> None:
        self.out, self.limit = out, limit
        self.files: list[tuple[Path, list[str], int]] = []
        self.pending: dict[str, torch.Tensor] = {}
        self.size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.size + nbytes > self.limit:
            self.flush()
        self.pending[name] = tensor
        self.size += nbytes
        if self.size >= self.limit:  # a large tensor is written at once, not kept
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.out / f".part-{len(self.files):05d}.safetensors"
        write_shard(path, self.pending)
        self.files.append((path, sorted(self.pending), self.size))
        self.pending, self.size = {}, 0

    def finish(self) -> list[str]:
        """Rename the shards to their final names, write the index; the names written."""
        self.flush()
        n = len(self.files)
        weight_map, total = {}, 0
        for i, (path, names, size) in enumerate(self.files):
            final = SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.out / final)
            weight_map.update(dict.fromkeys(names, final))
            total += size
        if n > 1:
            index = {
                "metadata": {"total_size": total},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (self.out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return sorted(weight_map)


def _dequantize(tensor: Any, rows: int = 4096) -> np.ndarray:
    """`tensor`'s values, de-quantised `rows` rows at a time into one fp32 array: the
    `gguf` package's de-quantisers hold several temporaries the size of their output,
    which for a whole 151936-row embedding took the conversion to 4 GB."""
    from gguf import GGMLQuantizationType, dequantize

    data, kind = tensor.data, tensor.tensor_type
    plain = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
    if kind in plain or data.ndim < 2 or data.shape[0] <= rows:
        return dequantize(data, kind)
    first = dequantize(data[:rows], kind)
    out = np.empty((data.shape[0], *first.shape[1:]), dtype=first.dtype)
    out[:rows] = first
    for start in range(rows, data.shape[0], rows):
        out[start : start + rows] = dequantize(data[start : start + rows], kind)
    return out


def write_dequantized(
    path: Path, out: Path, config: PretrainedConfig, shard_bytes: int = SHARD_BYTES
) -> str:
    """The tensors of the GGUF file at `path` as fp32 safetensors in the directory `out`,
    under the names `AutoModelForCausalLM.from_config(config)` gives them; returns that
    model's class name (the config's `architectures`)."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    # the processors read the config and put the parts of a split tensor (experts) in
    # "tensors"; the parsed tokenizer is not kept
    config_fields = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    parsed: dict[str, Any] = {"config": config_fields, "tensors": {}}
    reader = GGUFReader(path)
    architecture = read_field(reader, "general.architecture")[0]
    # only the tensors are read from here on; the metadata fields hold the vocabulary as
    # ~150k small arrays (290 MB for Qwen's, measured) that a memory cap counts
    reader.fields.clear()
    return_freed_memory()
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config_fields)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    skeleton.tie_weights()  # on meta, from_config leaves a tied head untied (transformers 5)
    mapping = get_gguf_hf_weights_map(skeleton, processor)

    shards = _Shards(out, shard_bytes)
    for tensor in tqdm(reader.tensors, desc="de-quantising GGUF", unit="tensor", leave=False):
        result = processor.process(
            weights=_dequantize(tensor),
            name=tensor.name,
            tensor_key_mapping=mapping,
            parsed_parameters=parsed,
        )
        if result.name in mapping and result.weights is not None:
            array = np.ascontiguousarray(result.weights, dtype=np.float32)
            if not array.flags.writeable:  # an F32 tensor is a view of the mapped file
                array = array.copy()
            shards.add(mapping[result.name], torch.from_numpy(array))
            del array  # written or pending: not also held while the next one is made
        del result
        for name in list(parsed["tensors"]):
            shards.add(name, parsed["tensors"].pop(name).float().contiguous())
    written = set(shards.finish())

    expected = set(skeleton.state_dict())
    head = skeleton.get_output_embeddings()
    if head is not None and head.weight is skeleton.get_input_embeddings().weight:
        expected -= {n for n, p in skeleton.named_parameters(remove_duplicate=False)
                     if p is head.weight and n not in written}  # fmt: skip
    if missing := sorted(expected - written):
        raise SparseLLMError(
            f"{path}: no tensor for {len(missing)} parameters of the model "
            f"(e.g. {', '.join(missing[:3])})"
        )
    return type(skeleton).__name__
