"""Long-context synthetic retrieval tasks, generated in code from a seeded haystack.

Perplexity on 512-token windows says nothing about whether a model can still *find*
something 8k tokens back, and that is what pruning and sparse attention break first.
Three tasks, all built in token space so every prompt has exactly the requested length:

* ``passkey`` (Mohtashami & Jaggi, 2023): a 5-digit pass key stated once at a random
  depth inside filler text; the model must repeat it.
* ``needle`` (needle-in-a-haystack, RULER's single-needle form): a 7-digit "special
  magic number" for a named key, on a grid of depths × lengths.
* ``vartrack`` (RULER's variable tracking, multi-hop): two assignment chains
  ``VAR A = 12345 … VAR B = VAR A … VAR C = VAR B`` scattered through the text; asked
  for the value of the last variable of one chain (the other chain is the distractor).

The haystack is real prose (the bundled ``wiki`` corpus, `<doc>` lines stripped) from a
seeded random offset, so samples differ but are reproducible. A sample is correct when
greedy decoding would emit exactly the answer: every answer token is the argmax given
the prompt and the answer's earlier tokens (one forward per sample, the LM head only at
the answer positions). Prompts never exceed the model's window: a longer request is an
error, not a silent truncation.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from sparsellm.data.corpora import bos_prefix, encode, read_text, resolve_corpus
from sparsellm.errors import SparseLLMError
from sparsellm.eval.logits import LogitsFn, model_logits
from sparsellm.eval.zeroshot import encode_pair
from sparsellm.models.adapters import context_window

TASKS = ("passkey", "needle", "vartrack")
DEFAULT_LENGTHS = (512, 1024, 2048, 4096, 8192)
HAYSTACK_CHARS = 400_000  # ~90k tokens: room for random offsets at 8192 tokens

_INTRO = {
    "passkey": "There is an important piece of information hidden inside a lot of "
    "irrelevant text. Find it and memorize it. I will quiz you about it.\n\n",
    "needle": "Some special magic numbers are hidden within the following text. Make sure "
    "to memorize them. I will quiz you about the numbers afterwards.\n\n",
    "vartrack": "Memorize and track the chain(s) of variable assignments hidden in the "
    "following text.\n\n",
}
_KEYS = (
    "amber-falcon",
    "quiet-harbor",
    "silver-orchid",
    "rapid-glacier",
    "hollow-meadow",
    "crimson-lantern",
    "velvet-canyon",
    "brisk-willow",
)


@dataclass
class Sample:
    """One prompt (token ids), its answer tokens, and where the information sits."""

    task: str
    length: int
    depth: float
    prompt: list[int]
    answer: list[int]


def _with_inserts(
    filler: list[int], inserts: list[tuple[float, list[int]]], budget: int
) -> list[int]:
    """`budget` tokens: filler with each insert placed at its relative depth (0=start)."""
    n_fill = budget - sum(len(ids) for _, ids in inserts)
    if n_fill < 0:
        raise SparseLLMError("length too short for the task's inserted facts")
    out: list[int] = []
    pos = 0
    for depth, ids in sorted(inserts, key=lambda x: x[0]):
        cut = round(depth * n_fill)
        out += filler[pos:cut] + ids
        pos = cut
    return out + filler[pos:n_fill]


def build_sample(
    tokenizer: Any,
    haystack: list[int],
    task: str,
    length: int,
    depth: float,
    rng: random.Random,
) -> Sample:
    """One `task` sample of exactly `length` prompt+answer tokens (minus one, as scored)."""
    enc = lambda text: encode(tokenizer, text).tolist()  # noqa: E731
    if task == "passkey":
        key = str(rng.randint(10_000, 99_999))
        facts = [(depth, enc(f" The pass key is {key}. Remember it. {key} is the pass key. "))]
        question, answer = "\n\nWhat is the pass key? The pass key is", f" {key}"
    elif task == "needle":
        name, value = rng.choice(_KEYS), str(rng.randint(1_000_000, 9_999_999))
        facts = [(depth, enc(f" One of the special magic numbers for {name} is: {value}. "))]
        question = (
            f"\n\nWhat is the special magic number for {name} mentioned in the provided "
            f"text? The special magic number for {name} mentioned in the provided text is"
        )
        answer = f" {value}"
    elif task == "vartrack":
        names: list[str] = []
        while len(names) < 6:
            name = "".join(rng.choices("ABCDEFGHJKLMNPQRSTUVWXYZ", k=4))
            names += [] if name in names else [name]
        values = rng.sample(range(10_000, 100_000), 2)
        facts = []
        for chain, value, first in ((names[:3], values[0], depth), (names[3:], values[1], None)):
            statements = [f" VAR {chain[0]} = {value}. "] + [
                f" VAR {b} = VAR {a}. " for a, b in itertools.pairwise(chain)
            ]
            # hops appear in order; the asked chain starts at `depth` of the first half
            lo = 0.5 * first if first is not None else rng.uniform(0, 0.5)
            where = [lo, *sorted(rng.uniform(lo, 1) for _ in statements[1:])]
            facts += [(d, enc(st)) for d, st in zip(where, statements, strict=True)]
        question = (
            f"\n\nQuestion: following the chain of assignments, what number is VAR "
            f"{names[2]} equal to? Answer: VAR {names[2]} ="
        )
        answer = f" {values[0]}"
    else:
        raise SparseLLMError(f"unknown long-context task {task!r}; valid: {', '.join(TASKS)}")
    intro = bos_prefix(tokenizer) + enc(_INTRO[task])
    q_ids, a_ids = encode_pair(tokenizer, question, answer, bos=False)
    budget = length + 1 - len(intro) - len(q_ids) - len(a_ids)
    if budget < 16:
        raise SparseLLMError(f"length {length} is too short for {task}")
    start = rng.randint(0, len(haystack) - budget - 1)
    body = _with_inserts(haystack[start : start + budget], facts, budget)
    return Sample(task, length, depth, intro + body + q_ids, a_ids)


def haystack_ids(tokenizer: Any, source: str = "wiki", chars: int = HAYSTACK_CHARS) -> list[int]:
    """Filler token ids: the first `chars` characters of a corpus, tokenized once."""
    return encode(tokenizer, read_text(resolve_corpus(source))[:chars]).tolist()


def make_samples(
    tokenizer: Any,
    task: str,
    lengths: tuple[int, ...] = DEFAULT_LENGTHS,
    samples: int = 3,
    seed: int = 0,
    haystack: list[int] | None = None,
) -> list[Sample]:
    """`samples` per length, seeded. The needle task puts them on an even depth grid
    (0 … 1, so `samples` = 5 gives depths 0, .25, .5, .75, 1); the others at random depths.
    """
    hay = haystack if haystack is not None else haystack_ids(tokenizer)
    if len(hay) < max(lengths) + 1:
        raise SparseLLMError(f"haystack has {len(hay)} tokens, fewer than {max(lengths)}")
    rng = random.Random(f"{task}-{seed}")
    out = []
    for length in lengths:
        if task == "needle":
            grid = [i / max(samples - 1, 1) for i in range(samples)]
        else:
            grid = [rng.uniform(0, 1) for _ in range(samples)]
        out += [build_sample(tokenizer, hay, task, length, d, rng) for d in grid]
    return out


def request(sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
    """The ids and the positions whose logits say whether greedy decoding after the
    prompt yields exactly the answer tokens."""
    ids = torch.tensor([sample.prompt + sample.answer[:-1]])
    first = len(sample.prompt) - 1
    return ids, torch.arange(first, first + len(sample.answer))


def decodes_answer(logits: torch.Tensor, sample: Sample) -> bool:
    """Whether the logits of `request(sample)` decode greedily to the answer."""
    return bool((logits[0].argmax(-1) == torch.tensor(sample.answer)).all())


@torch.no_grad()
def answer_correct(model: torch.nn.Module, sample: Sample) -> bool:
    """Whether greedy decoding after the prompt yields exactly the answer tokens."""
    return decodes_answer(next(model_logits(model)([request(sample)])), sample)


def check_lengths(model: torch.nn.Module, lengths: tuple[int, ...]) -> None:
    """Refuse lengths beyond the model's window (before any work starts)."""
    limit = context_window(model)
    for n in lengths:
        if n < 64:
            raise SparseLLMError(f"long-context lengths must be >= 64 tokens, got {n}")
        if limit and n > limit:
            raise SparseLLMError(
                f"long-context length {n} exceeds the model's window {limit}; "
                "refusing to truncate silently"
            )


def evaluate_longctx(
    model: torch.nn.Module,
    tokenizer: Any,
    task: str,
    lengths: tuple[int, ...] = DEFAULT_LENGTHS,
    samples: int = 3,
    seed: int = 0,
    logits: LogitsFn | None = None,
) -> dict[str, Any]:
    """Accuracy overall, per length, and (needle) per depth × length cell. The logits come
    from `logits` when given (a streamed model), else from `model`'s forward."""
    check_lengths(model, lengths)
    items = make_samples(tokenizer, task, lengths, samples, seed)
    answers = (logits or model_logits(model))([request(s) for s in items])
    bar = tqdm(zip(answers, items, strict=True), total=len(items), desc=task, unit="sample",
               leave=False)  # fmt: skip
    hits = [decodes_answer(out, s) for out, s in bar]
    acc = sum(hits) / len(hits)
    by_length = {
        str(n): sum(h for h, s in zip(hits, items, strict=True) if s.length == n)
        / sum(s.length == n for s in items)
        for n in lengths
    }
    out: dict[str, Any] = {
        "task": task,
        "kind": "longctx",
        "docs": len(items),
        "acc": acc,
        "acc_stderr": math.sqrt(acc * (1 - acc) / max(len(hits) - 1, 1)),
        "by_length": by_length,
        "seed": seed,
        "samples_per_length": samples,
    }
    if task == "needle":
        out["grid"] = {
            f"{s.length}@{s.depth:.2f}": float(h) for h, s in zip(hits, items, strict=True)
        }
    return out
