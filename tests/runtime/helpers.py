"""Shared helpers of the runtime tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest


@contextmanager
def native_isa(isa: str) -> Iterator[Any]:
    """The native extension with `isa`'s kernels inside the block, `auto` after it; the
    test is skipped where there is no C++ compiler or the CPU lacks the instructions."""
    from sparsellm.runtime.kernels import native_kernel

    mod = native_kernel()
    if mod is None:
        pytest.skip("no C++ compiler here")
    try:
        mod.set_isa(isa)
    except RuntimeError:
        pytest.skip(f"this CPU has no {isa}")
    try:
        yield mod
    finally:
        mod.set_isa("auto")
