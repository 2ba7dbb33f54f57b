"""Rewrite a checkpoint one block at a time, resumably: the engine of streamed runs.

An in-RAM step holds the whole model; this holds one block. The model is a skeleton with
meta parameters (`sparsellm.models.shards`); the calibration inputs of block 0 come from
the embeddings (read, used, released), and then per block: read its tensors, hand it to
the step's `process` (which may collect statistics with `forward` and changes the block
in place: a weight method prunes it, a width method removes heads and channels), run it
once more for the next block's inputs, write it as its own shard, release it. The math
is the in-RAM step's own (`run_block`, the step's `process`), so the weights are
bit-identical to an in-RAM run of the same step.

Resuming: everything lives in a work directory. After block i its shard is written, the
activations entering block i+1 sit in one of two files (``hidden-a.bin`` /
``hidden-b.bin``, alternating, so the inputs of the block being worked on are never
overwritten), and then ``stream_state.json`` records ``done = i + 1``, which file holds
them and what `process` reported (atomically). A run killed anywhere restarts from the
last recorded block; a work directory written for different inputs (source, step,
calibration) is refused.

Activations either live in RAM and are copied to their file after each block, or, when
they exceed `max_memory` bytes, live in the files themselves (shared memory maps that
the OS can page out): then a run needs RAM for one block, its statistics and one batch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from sparsellm.calib.sequential import BlockCall, run_block
from sparsellm.calib.streamed import capture
from sparsellm.errors import SparseLLMError
from sparsellm.export.hf import write_json_atomic
from sparsellm.models.adapters import blocks_prefix, get_blocks
from sparsellm.models.shards import (
    INDEX,
    Checkpoint,
    copy_shard,
    mapped_tensor,
    materialize,
    release,
    return_freed_memory,
    tensor_bytes,
    write_shard,
)

STATE = "stream_state.json"

# process(i, block, forward) changes block i in place and returns what to record of it;
# `forward()` runs the block over the calibration batches (None without calibration)
BlockProcess = Callable[[int, nn.Module, Callable[[], None] | None], dict[str, Any]]


def fingerprint(
    ckpt: Checkpoint,
    step: dict[str, Any],
    calib: torch.Tensor | None,
    batch_size: int,
    calib_dtype: torch.dtype | None,
) -> dict:
    """What decides a streamed run's weights: the source shards (names and sizes), the
    step, the calibration tokens, the batching and the calibration dtype (None is fp32);
    a resume must match it exactly."""
    src = ckpt.path
    shards = {s: (src / s).stat().st_size for s in sorted(set(ckpt.weight_map.values()))}
    tokens = None
    if calib is not None:
        tokens = hashlib.sha256(calib.to(torch.int64).numpy().tobytes()).hexdigest()
    return {
        "source": str(src.resolve()),
        "shards": shards,
        "step": step,
        "calib_sha256": tokens,
        "batch_size": batch_size,
        "calib_dtype": str(calib_dtype or torch.float32),
    }


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _resume_state(work: Path, fp: dict) -> dict:
    state_file = work / STATE
    if not state_file.is_file():
        if work.exists() and any(work.iterdir()):
            raise SparseLLMError(f"{work} exists and is not a streamed run's directory")
        work.mkdir(parents=True, exist_ok=True)
        state = {"fingerprint": fp, "done": 0, "layers": {}, "hidden": None, "complete": False}
        write_json_atomic(state_file, state)
        return state
    state = json.loads(state_file.read_text())
    old = state.get("fingerprint", {})
    if old != fp:
        keys = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
        raise SparseLLMError(
            f"{work} holds a streamed run of a different command (differs in: "
            f"{', '.join(keys)}); remove it or repeat the command that started it"
        )
    return state


class Activations:
    """The calibration activations entering the current block, and where they are kept.

    Two files alternate: the current block's inputs are in ``files[0]`` (as recorded in
    the state), its outputs go to ``files[1]``. `mapped`: the buffers are the files
    themselves (inputs and outputs in two maps); otherwise one RAM buffer is updated in
    place, batch by batch as `run_sequential` does, and copied to ``files[1]`` after
    the block.
    """

    def __init__(
        self,
        files: list[Path],
        shape: tuple[int, ...],
        dtype: torch.dtype,
        mapped: bool,
        fresh: bool,
    ) -> None:
        self.files, self.mapped = files, mapped
        if mapped:
            self.bufs = [mapped_tensor(f, shape, dtype) for f in files]
        else:  # resuming: the recorded file's content, copied into RAM
            first = (
                torch.empty(shape, dtype=dtype)
                if fresh
                else mapped_tensor(files[0], shape, dtype).clone()
            )
            self.bufs = [first, first]

    def advance(self) -> None:
        """Make the outputs just written the next block's inputs (on disk too)."""
        if not self.mapped:
            self.bufs[1].reshape(-1).view(torch.uint8).numpy().tofile(self.files[1])
        self.bufs.reverse()
        self.files.reverse()


def _cast_calls(calls: list[list[BlockCall]], dtype: torch.dtype | None) -> list[list[BlockCall]]:
    """`calls` in `dtype`, each distinct tensor cast once (every block shares the rotary
    tables of a batch; casting per block, as `run_sequential` may, costs n_blocks copies)."""
    if dtype is None:
        return calls
    memo: dict[int, Any] = {}

    def cast(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            if id(value) not in memo:
                memo[id(value)] = value.to(dtype)
            return memo[id(value)]
        if isinstance(value, tuple):
            return tuple(cast(v) for v in value)
        return value

    return [
        [BlockCall(args=cast(c.args), kwargs={k: cast(v) for k, v in c.kwargs.items()}) for c in bc]
        for bc in calls
    ]


def _copy_into(outputs: list[torch.Tensor], b: int, y: torch.Tensor) -> None:
    outputs[b].copy_(y)


def _block_keys(ckpt: Checkpoint, prefix: str) -> list[str]:
    return sorted(k for k in ckpt.weight_map if k.startswith(prefix))


def _block_tensors(block: nn.Module, ckpt: Checkpoint, prefix: str) -> dict[str, torch.Tensor]:
    """The block's tensors under the source checkpoint's names for them."""
    sd = block.state_dict()
    return {k: sd[k[len(prefix) :]] for k in _block_keys(ckpt, prefix)}


def _finish(ckpt: Checkpoint, work: Path, prefix: str, n: int) -> None:
    """The tensors outside the blocks, copied as the last shard, and the index."""
    rest = sorted(k for k in ckpt.weight_map if not k.startswith(f"{prefix}."))
    copy_shard(ckpt, rest, work / shard_name(n, n + 1))
    weight_map: dict[str, str] = {}
    total = 0
    for i in range(n + 1):
        shard = shard_name(i, n + 1)
        for key, nbytes in tensor_bytes(work / shard).items():
            weight_map[key] = shard
            total += nbytes
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_json_atomic(work / INDEX, index)


def check_blocks_present(model: nn.Module, ckpt: Checkpoint) -> None:
    """Every tensor of every block is in the checkpoint, before any work."""
    prefix = blocks_prefix(model)
    for i, block in enumerate(get_blocks(model)):
        have = set(_block_keys(ckpt, f"{prefix}.{i}."))
        for name, _ in block.named_parameters():
            if f"{prefix}.{i}.{name}" not in have:
                raise SparseLLMError(f"{ckpt.path}: block {i} has no tensor {prefix}.{i}.{name!r}")


def stream_blocks(
    model: nn.Module,
    ckpt: Checkpoint,
    work: Path,
    fp: dict,
    process: BlockProcess,
    *,
    calib: torch.Tensor | None,
    batch_size: int,
    calib_dtype: torch.dtype | None,
    max_memory: int | None,
    desc: str,
) -> dict[str, Any]:
    """Run `process` on every block of the skeleton `model` (read from `ckpt`) and write
    the results into `work`; returns the merged records of `process` for every block.

    When it returns, `work` holds the block shards, the untouched tensors (embeddings,
    final norm, head) in a last shard and the safetensors index; config and tokenizer are
    the caller's. Called again with the same `fp` after a kill, it continues where it
    stopped (a complete run returns its records at once). Without `calib`, `process` gets
    no `forward`.
    """
    prefix, blocks = blocks_prefix(model), get_blocks(model)
    n = len(blocks)
    check_blocks_present(model, ckpt)
    state = _resume_state(work, fp)
    if state["complete"]:
        return state["layers"]

    acts, calls = None, None
    dtype = calib_dtype or torch.float32
    if calib is not None:
        shape = (calib.shape[0], calib.shape[1], model.config.hidden_size)
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        files = [work / "hidden-a.bin", work / "hidden-b.bin"]
        if state["hidden"] == files[1].name:
            files.reverse()
        mapped = max_memory is not None and 2 * nbytes > max_memory
        fresh = state["done"] == 0
        acts = Activations(files, shape, dtype, mapped, fresh)
        calls = capture(model, ckpt, calib, batch_size, acts.bufs[0] if fresh else None)
        calls = _cast_calls(calls, calib_dtype)

    for i in tqdm(range(state["done"], n), desc=desc, unit="block"):
        block = blocks[i]
        materialize(block, ckpt, f"{prefix}.{i}.")
        forward = None
        if acts is not None:
            inputs = list(acts.bufs[0].split(batch_size))
            outputs = list(acts.bufs[1].split(batch_size))
            forward = partial(run_block, block, inputs, calls[i], calib_dtype)
        with torch.no_grad():
            state["layers"].update(process(i, block, forward))
            if acts is not None and i < n - 1:
                run_block(block, inputs, calls[i], calib_dtype, partial(_copy_into, outputs))
        write_shard(work / shard_name(i, n + 1), _block_tensors(block, ckpt, f"{prefix}.{i}."))
        release(block)
        return_freed_memory()  # the block's freed buffers, back to the OS before the next
        if acts is not None and i < n - 1:
            acts.advance()
            state["hidden"] = acts.files[0].name
        state["done"] = i + 1
        write_json_atomic(work / STATE, state)
    _finish(ckpt, work, prefix, n)
    for name in ("hidden-a.bin", "hidden-b.bin"):
        with suppress(FileNotFoundError):
            (work / name).unlink()
    state["complete"] = True
    write_json_atomic(work / STATE, state)
    return state["layers"]
