"""One task namespace for the CLI and the API: zero-shot, knowledge/reading QA, long context.

Users name tasks (``arc_easy,passkey``), groups (``zeroshot``, ``knowledge``,
``longctx``) or ``all``; names are validated — and the data package checked — before any
model is loaded, so a typo costs nothing.
"""

from __future__ import annotations

from typing import Any

import torch

from sparsellm.errors import SparseLLMError
from sparsellm.eval import longctx, zeroshot
from sparsellm.eval.logits import LogitsFn

GROUPS: dict[str, tuple[str, ...]] = {**zeroshot.GROUPS, "longctx": longctx.TASKS}
ALL_TASKS: tuple[str, ...] = (*zeroshot.TASKS, *longctx.TASKS)


def resolve_tasks(spec: str) -> tuple[str, ...]:
    """Task names from a comma list of tasks, groups or ``all`` (order kept, no repeats)."""
    names: list[str] = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        expanded = ALL_TASKS if item == "all" else GROUPS.get(item, (item,))
        for name in expanded:
            if name not in ALL_TASKS:
                raise SparseLLMError(
                    f"unknown task {name!r}; valid tasks: {', '.join(ALL_TASKS)}; "
                    f"groups: {', '.join(GROUPS)}, all"
                )
            if name in zeroshot.TASKS:
                path = zeroshot.task_path(name)
                if not path.is_file():
                    raise SparseLLMError(f"request file for {name!r} is missing: {path}")
            if name not in names:
                names.append(name)
    return tuple(names)


def run_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: tuple[str, ...],
    limit: int | None = 200,
    lengths: tuple[int, ...] = longctx.DEFAULT_LENGTHS,
    samples: int = 3,
    batch_size: int = 16,
    logits: LogitsFn | None = None,
) -> dict[str, dict[str, Any]]:
    """Every task's metrics; long-context lengths are checked against the window first.
    With `logits` (a streamed model's), `model` is only read for its config."""
    if any(t in longctx.TASKS for t in tasks):
        longctx.check_lengths(model, lengths)
    out = {}
    for task in tasks:
        if task in longctx.TASKS:
            out[task] = longctx.evaluate_longctx(
                model, tokenizer, task, lengths, samples, logits=logits
            )
        else:
            out[task] = zeroshot.evaluate_task(
                model, tokenizer, task, limit, batch_size, logits=logits
            )
    return out
