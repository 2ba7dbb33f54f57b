"""Read a safetensors checkpoint one block at a time, and write one shard per block.

A model larger than RAM can still be pruned block by block: the model is built with its
parameters on the `meta` device (no memory; buffers such as rotary tables stay real), and
each block's tensors are read from the memory-mapped shards only while that block is
worked on. `Checkpoint` checks the whole index up front — every tensor the skeleton needs
present, every shard as long as its header says — so a bad checkpoint fails before hours
of work rather than at block 27.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from sparsellm.errors import SparseLLMError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# files a checkpoint directory holds weights in (everything else is config or tokenizer)
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", INDEX, "stream_state.json")


def _header(path: Path) -> tuple[int, dict]:
    """A safetensors file's header length and header."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SparseLLMError(f"{path} is truncated: no safetensors header")
        (n,) = struct.unpack("<Q", head)
        try:
            return n, json.loads(f.read(n))
        except ValueError:
            raise SparseLLMError(f"{path} has a corrupt safetensors header") from None


def _shard_data_end(path: Path) -> int:
    """Bytes a safetensors file must hold by its own header (header + largest data end)."""
    n, header = _header(path)
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + n + max(ends, default=0)


def tensor_bytes(path: Path) -> dict[str, int]:
    """Bytes of each tensor in a safetensors file, from its header."""
    _, header = _header(path)
    return {
        k: v["data_offsets"][1] - v["data_offsets"][0]
        for k, v in header.items()
        if k != "__metadata__"
    }


def fp32_bytes(ckpt: Checkpoint) -> int:
    """Bytes the checkpoint's tensors take in fp32 (what `load_model` would hold)."""
    total = 0
    for shard in set(ckpt.weight_map.values()):
        _, header = _header(ckpt.path / shard)
        for key, v in header.items():
            if key != "__metadata__":
                total += 4 * math.prod(v["shape"])
    return total


class Checkpoint:
    """The tensors of a HF safetensors checkpoint directory, by name, read on demand."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if (self.path / INDEX).is_file():
            weight_map = json.loads((self.path / INDEX).read_text())["weight_map"]
        elif (self.path / SINGLE).is_file():
            weight_map = dict.fromkeys(tensor_bytes(self.path / SINGLE), SINGLE)
        else:
            raise SparseLLMError(
                f"{self.path} has no safetensors weights ({SINGLE} or {INDEX}): streaming "
                "reads safetensors only"
            )
        self.weight_map: dict[str, str] = weight_map
        for shard in sorted(set(weight_map.values())):
            file = self.path / shard
            if not file.is_file():
                raise SparseLLMError(f"{file} is listed in the index but missing")
            need, have = _shard_data_end(file), file.stat().st_size
            if have < need:
                raise SparseLLMError(f"{file} is truncated: {have} bytes of {need}")

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors, each read from its shard into memory of its own.

        Plain reads, not a memory map: a mapped 933 MB embedding counts in the process's
        RSS beside its copy (twice the memory at that moment), which is what killed a
        2 GiB-capped run of a 1.5B model."""
        by_shard: dict[str, list[str]] = {}
        for name in names:
            if name not in self.weight_map:
                raise SparseLLMError(f"{self.path}: the checkpoint has no tensor {name!r}")
            by_shard.setdefault(self.weight_map[name], []).append(name)
        out = {}
        for shard, keys in by_shard.items():
            n, header = _header(self.path / shard)
            with open(self.path / shard, "rb") as f:
                for key in keys:
                    entry = header[key]
                    if entry["dtype"] not in DTYPES:
                        raise SparseLLMError(f"{shard}: tensor {key!r} has dtype {entry['dtype']}")
                    start, end = entry["data_offsets"]
                    tensor = torch.empty(entry["shape"], dtype=DTYPES[entry["dtype"]])
                    view = tensor.reshape(-1).view(torch.uint8).numpy()
                    f.seek(8 + n + start)
                    if end - start != view.nbytes or f.readinto(view) != view.nbytes:
                        raise SparseLLMError(f"{self.path / shard}: tensor {key!r} is truncated")
                    out[key] = tensor
        return out


def skeleton(path: str | os.PathLike) -> nn.Module:
    """The model of the checkpoint at `path` with every parameter on `meta` (no memory)."""
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # on meta, from_config leaves a tied head untied (transformers 5)
    return model.eval()


def _slots(module: nn.Module) -> dict[str, list[tuple[nn.Module, str]]]:
    """Each parameter's name (as `named_parameters` gives it) and every (module, attribute)
    that holds it: tied weights (embeddings and head) are set and released together."""
    names: dict[int, str] = {id(p): n for n, p in module.named_parameters()}
    slots: dict[str, list[tuple[nn.Module, str]]] = {n: [] for n in names.values()}
    for name, param in module.named_parameters(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        slots[names[id(param)]].append((module.get_submodule(owner) if owner else module, leaf))
    return slots


def materialize(
    module: nn.Module, ckpt: Checkpoint, prefix: str = "", names: set[str] | None = None
) -> None:
    """Give `module`'s meta parameters (those in `names`, relative, if given) their fp32
    values from `ckpt`, where they are named `prefix` + their name.

    fp32 like `load_model`, so a streamed run computes on the very values an in-RAM run
    of the same checkpoint would.
    """
    slots = {n: s for n, s in _slots(module).items() if names is None or n in names}
    tensors = ckpt.read(f"{prefix}{n}" for n in slots)
    for name, holders in slots.items():
        value = tensors[f"{prefix}{name}"]
        param = nn.Parameter(value.float() if value.is_floating_point() else value, False)
        for sub, leaf in holders:
            sub._parameters[leaf] = param


def release(module: nn.Module, names: set[str] | None = None) -> None:
    """Send `module`'s parameters (those in `names`, if given) back to `meta`, freeing
    their memory; buffers stay."""
    for name, holders in _slots(module).items():
        if names is None or name in names:
            param = nn.Parameter(holders[0][0]._parameters[holders[0][1]].to("meta"), False)
            for sub, leaf in holders:
                sub._parameters[leaf] = param


def mapped_tensor(path: Path, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor whose memory is the file at `path` (created zero-filled if absent or of
    another size; a shared map, so writes reach the file). Pages of such a tensor can be
    written back and dropped by the OS under memory pressure, unlike anonymous memory."""
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if not path.exists() or path.stat().st_size != nbytes:
        with open(path, "wb") as f:
            f.truncate(nbytes)
    return torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)


def spill_tensor(directory: Path, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled file-backed tensor in `directory` whose file is already unlinked: the
    space lives as long as the tensor, and nothing is left behind by a crash."""
    fd, name = tempfile.mkstemp(prefix=".spill-", dir=directory)
    os.close(fd)
    try:
        return mapped_tensor(Path(name), shape, dtype)
    finally:
        os.unlink(name)


def return_freed_memory() -> None:
    """Hand memory the allocator keeps after frees back to the OS (glibc's malloc_trim).

    Tokenizing the corpora leaves ~300 MB of freed small objects in glibc's arenas
    (Qwen's tokenizer, measured): counted in RSS, and under a memory cap, until trimmed.
    A no-op where glibc is not the allocator."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None


def _sync_and_drop(path: Path) -> None:
    """Write `path`'s pages to disk and drop them from the page cache. Why: under a cgroup
    v1 memory limit, dirty pages count against the limit and are not written back in time
    to be reclaimed; a 2 GiB-capped conversion of a 1.5B GGUF was killed with its fp32
    shards' pages still dirty."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """A temporary path that becomes `path` (synced, out of the page cache) when the block
    succeeds; a failed write (a full disk) leaves no partial file and says so in one line."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        _sync_and_drop(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if not isinstance(exc, (OSError, SafetensorError)):
            raise
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise SparseLLMError(
            f"could not write {path} ({reason}); the run so far is kept in {path.parent}: "
            "free space and rerun the same command to continue"
        ) from None


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write `tensors` as one safetensors file, atomically."""
    with _atomic(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})


def copy_shard(ckpt: Checkpoint, names: Iterable[str], path: Path, chunk: int = 1 << 26) -> None:
    """The named tensors of `ckpt`, unchanged, as one safetensors file at `path`
    (atomically), copied as bytes `chunk` at a time.

    Why not `write_shard(ckpt.read(names))`: the tensors outside the blocks of a 1.5B
    model are a 933 MB embedding and a 933 MB head, and holding both killed a 2 GiB-capped
    streamed run at its last step."""
    names = sorted(names)
    sources, header, offset = [], {}, 0
    for name in names:
        shard = ckpt.path / ckpt.weight_map[name]
        n, head = _header(shard)
        entry = head[name]
        start, end = entry["data_offsets"]
        header[name] = {**entry, "data_offsets": [offset, offset + end - start]}
        sources.append((shard, 8 + n + start, end - start))
        offset += end - start
    text = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":"))
    raw = text.encode() + b" " * (-len(text.encode()) % 8)  # data 8-byte aligned
    with _atomic(path) as tmp, open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        for shard, start, size in sources:
            with open(shard, "rb") as f:
                f.seek(start)
                while size > 0:
                    data = f.read(min(chunk, size))
                    if not data:
                        raise SparseLLMError(f"{shard} is truncated")
                    out.write(data)
                    size -= len(data)
