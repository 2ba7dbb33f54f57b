"""Context managers for forward hooks that are always removed, even on error."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def input_hooks(
    modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None]
) -> Iterator[None]:
    """Call ``fn(name, x)`` with the first input of each module before it runs.

    `x` is the very tensor object the module received (not a detached copy), so callers
    can recognise modules that share an input by identity. Pre-hooks (not post-hooks)
    let `fn` raise `sparsellm.calib.sequential.StopBlock` to skip the rest of the block
    once everything it needs has been seen.
    """
    handles = []
    try:
        for name, module in modules.items():

            def hook(_mod: nn.Module, args: tuple, _name: str = name) -> None:
                fn(_name, args[0])

            handles.append(module.register_forward_pre_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()
