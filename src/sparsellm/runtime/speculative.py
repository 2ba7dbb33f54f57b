"""Speculative decoding on the CPU runtime: a cheap draft proposes tokens, the target checks
them all in one pass, and the output is the target's own.

Long module: the verification loop and the drafts it drives share one small protocol
(`propose` a tree, `update` after each pass) and are only meaningful together.

Why it is exact here: `DecodeRuntime.step` gives every row of a pass the bits a lone
decode step would give it (batch-invariant kernels), so with greedy picking the tokens
are identical to the target's plain greedy decode, not merely close. With sampling, the
drafts' tokens are accepted by rejection (Leviathan et al. 2023, Chen et al. 2023) and
each emitted token is distributed as the target's: a model draft's token x ~ q is kept
with probability min(1, p(x)/q(x)), else the token is drawn from norm(max(p - q, 0)); a
deterministic draft (retrieval, token recycling) offers candidates c1, c2, ... at a node,
tried in turn, each kept with its probability under the residual left by the rejected
ones (SpecInfer's multi-candidate rule with point-mass proposals), else the token is
drawn from that residual.

Drafts (`build_draft` parses the `--draft` spec):
- `lookup`: prompt lookup decoding (Saxena 2023): the tokens that followed the latest
  earlier occurrence of the context's last n-gram (n = 3, 2, 1).
- `ngram`: ADED-style retrieval (Liu et al. 2024): n-gram counts over the prompt and the
  output so far (optionally a corpus, `ngram:corpus=c4`), the most frequent
  continuations expanded into a small tree.
- `token-recycling` (Luo et al. 2024): an adjacency matrix holding, per token, the
  target's top-k next tokens the last time that token was an input of a pass (every
  row of every pass refreshes it); a static tree is read out of it.
- `self:SPEC`: the target itself with an activation-sparsity recipe (e.g.
  `self:teal:sparsity=0.6`, calibrated by `prepare_target` before the runtime is built):
  the same weights and KV cache, decode steps that skip channels; the verification pass
  rewrites the cache with dense entries.
- `self:FORMAT` (`self:int8`, `self:bf16`, `self:int4`, ...): the target's own weights
  packed in a smaller format, on their own runtime over the target's KV cache (a
  quantized self-draft, as in QSpec, Zhao et al. 2024): a few times faster than a fp32
  target, and close enough to it that most of its tokens are accepted.
- `self:skip:ratio=R`: the target without round(R·n) of its blocks (a layer-skipping
  self-draft, as in Draft & Verify and SWIFT), chosen by depth pruning's training-free
  scores, on its own runtime over the target's KV cache.
- `self:int8+vocab:size=N[,corpus=c4]`: the draft's LM head keeps only the N tokens most
  frequent in a bundled corpus (FR-Spec, Zhao et al. 2025), plus the prompt's own: a
  small model's head is a fifth of its weights, and the target still verifies over the
  whole vocabulary.
- `self:int8+lookup[:n=N]`: prompt lookup first: a pass whose context's last N tokens
  (3) occurred before copies what followed them, and the model drafts only the others
  (the copied tokens cost no draft step).
- parts joined by '+' combine: `self:int8+teal:sparsity=0.4` (int8 weights skipping
  channels), `self:int8+skip:ratio=0.2`.
- a model directory: any model with the target's vocabulary, on its own runtime and cache.

The draft length adapts (`Pacer`): one more than the running mean of accepted draft
tokens, between 1 and `max_draft`, or no draft at all while passes without one produce
tokens faster (a wide pass costs more than a step on a CPU).
"""

from __future__ import annotations

import copy
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import torch

from sparsellm.errors import SparseLLMError
from sparsellm.models.compressed import PACKED_FORMATS

# Rows of one verification pass, root included (each extra row costs a fraction of a lone
# step: `pass_cost_in_steps` in results/speculative-qwen0.5b.md).
MAX_ROWS = 16


@dataclass
class Tree:
    """Draft tokens after the last accepted token: node i has parent parents[i] (-1: the
    root, i.e. the last accepted token); parents come before children. `q[i]`, for model
    drafts, is the distribution node i's token was drawn from (sampling only). `copied`:
    a model draft's pass that copied the context instead (its acceptance says nothing
    about the model's, so the draft length does not learn from it)."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    q: list[torch.Tensor] | None = None
    copied: bool = False

    def add(self, token: int, parent: int) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        return len(self.tokens) - 1

    def depth(self) -> list[int]:
        d: list[int] = []
        for p in self.parents:
            d.append(0 if p < 0 else d[p] + 1)
        return d

    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))


def chain(tokens: list[int], q: list[torch.Tensor] | None = None, copied: bool = False) -> Tree:
    return Tree(list(tokens), list(range(-1, len(tokens) - 1)), q, copied)


def target_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution a token is drawn from: softmax(logits / T) on the smallest set of
    tokens whose mass reaches top_p (as `sparsellm generate` and transformers sample)."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        drop = sorted_p.cumsum(0) - sorted_p >= top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return probs / probs.sum()


def accept_node(
    p: torch.Tensor,
    candidates: list[tuple[int, int]],
    q: list[torch.Tensor] | None,
    gen: torch.Generator,
) -> tuple[int, int]:
    """Speculative sampling at one node: `p` is the target's distribution there,
    `candidates` (child index, token) the draft's offers. Returns (child index or -1,
    token): the first accepted child, or -1 and a token drawn from the residual.

    Point-mass offers (q is None): child c is kept with probability residual(c), where
    the residual is p with the rejected offers removed and renormalised; one offer drawn
    from a model's q: kept with min(1, p/q), else the token comes from norm(max(p-q, 0)).
    Either way the returned token is distributed as p.
    """
    residual = p.clone()
    for child, token in candidates:
        u = float(torch.rand((), generator=gen, dtype=torch.float64))
        if q is not None:
            qx = float(q[child][token])
            if qx > 0 and u < min(1.0, float(residual[token]) / qx):
                return child, token
            residual = (residual - q[child].to(residual.dtype)).clamp_min(0)
        else:
            if u < float(residual[token]):
                return child, token
            residual[token] = 0
        total = float(residual.sum())
        if total <= 0:  # nothing left (p was a point mass on rejected tokens): keep p
            residual = p.clone()
            break
        residual = residual / total
    return -1, int(torch.multinomial(residual, 1, generator=gen))


class Draft:
    """What the verification loop asks of a draft. `context` is every token so far
    (prompt + accepted output, the last one not yet fed to the target)."""

    shares_cache = False  # True: drafts with the target's own cache row (self drafts)

    def propose(self, context: list[int], k: int, sample: Any) -> Tree:
        raise NotImplementedError

    def update(self, context: list[int], inputs: list[int], logits: torch.Tensor) -> None:
        """After a pass: `inputs` were its rows' tokens, `logits` the target's rows."""

    def prompt(self, ids: torch.Tensor) -> None:
        """A new generation starts from prompt `ids` (1, P)."""

    def for_rows(self, rows: int) -> list[Draft]:
        """Drafts for `rows` sequences decoded together (a batching server's cache rows,
        sequence r on row r): by default this one for all, its state being shared."""
        return [self] * rows


class Lookup(Draft):
    """Prompt lookup: copy what followed the latest earlier match of the last n-gram."""

    def __init__(self, max_ngram: int = 3) -> None:
        self.max_ngram = max_ngram

    def propose(self, context: list[int], k: int, sample: Any) -> Tree:
        for n in range(min(self.max_ngram, len(context) - 1), 0, -1):
            copied = copy_after(context, n, k)
            if copied:
                return chain(copied)
        return Tree()


def copy_after(context: list[int], n: int, k: int) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the context's last
    `n` >= 1 tokens (none without one)."""
    if n < 1:
        return []
    tail = context[-n:]
    for start in range(len(context) - n - 1, -1, -1):
        if context[start : start + n] == tail:
            return context[start + n : start + n + k]
    return []


class NGram(Draft):
    """ADED-style retrieval: counts of what followed each (n-1)-gram in the prompt, the
    output so far and an optional corpus; the best continuations form a tree whose first
    level keeps the `width` most frequent tokens and deeper levels the best one."""

    def __init__(self, n: int = 3, width: int = 2, corpus: list[int] | None = None) -> None:
        self.n, self.width = n, width
        self.base: dict[tuple[int, ...], Counter[int]] = defaultdict(Counter)
        if corpus:
            self._count(self.base, corpus, 0)
        self.table: dict[tuple[int, ...], Counter[int]] = defaultdict(Counter)
        self.seen = 0

    def _count(self, table: dict[tuple[int, ...], Counter[int]], toks: list[int], start: int):
        for m in range(1, self.n):
            for i in range(max(start - m, 0), len(toks) - m):
                table[tuple(toks[i : i + m])][toks[i + m]] += 1

    def prompt(self, ids: torch.Tensor) -> None:
        self.table = defaultdict(Counter)
        self.seen = 0

    def for_rows(self, rows: int) -> list[Draft]:
        # the counts of the prompt and output so far are per sequence; the corpus's shared
        return [copy.copy(self) for _ in range(rows)]

    def _next(self, context: list[int], top: int) -> list[int]:
        for m in range(self.n - 1, 0, -1):
            key = tuple(context[-m:])
            counts = self.table.get(key, Counter()) + self.base.get(key, Counter())
            if counts:
                return [t for t, _ in counts.most_common(top)]
        return []

    def propose(self, context: list[int], k: int, sample: Any) -> Tree:
        self._count(self.table, context, self.seen)
        self.seen = len(context)
        tree = Tree()
        for rank, token in enumerate(self._next(context, self.width)):
            parent, path = tree.add(token, -1), [*context, token]
            for _ in range(k - 1 if rank == 0 else max(k // 2 - 1, 0)):
                nxt = self._next(path, 1)
                if not nxt:
                    break
                parent = tree.add(nxt[0], parent)
                path.append(nxt[0])
        return tree


# Token Recycling's static trees: (parent, rank) per node, rank r meaning the parent's r-th
# most likely next token in the adjacency matrix. The paper's tree has ~80 nodes for a GPU,
# where a pass costs about a step whatever its size; here each extra row adds a fraction
# of a step, so a node must be accepted that often to pay for itself. The default keeps
# the top-1 path (cut to the adaptive draft length) and the root's second candidate: its
# first four nodes are the four positions bench/recycling_tree.py finds accepted most;
# `tree=wide` is a 9-node tree in the paper's shape.
RECYCLING_TREES = {
    "small": [(-1, 0), (-1, 1), (0, 0), (2, 0), (3, 0), (4, 0), (5, 0), (6, 0), (7, 0)],
    "wide": [(-1, 0), (-1, 1), (-1, 2), (0, 0), (0, 1), (1, 0), (3, 0), (3, 1), (6, 0)],
}


class TokenRecycling(Draft):
    """Candidate tokens recycled: row v of the adjacency matrix holds the target's top-k
    next tokens from the last pass in which v was an input. `tree` names a static tree of
    RECYCLING_TREES or gives one as (parent, rank) pairs, parents first. After `propose`,
    `nodes[i]` is the tree position of the proposal's node i (bench/recycling_tree.py
    counts which positions the target accepts, to fit a tree to a CPU's pass costs)."""

    def __init__(
        self, vocab: int, top_k: int = 3, tree: str | list[tuple[int, int]] = "small"
    ) -> None:
        if isinstance(tree, str):
            if tree not in RECYCLING_TREES:
                raise SparseLLMError(
                    f"token-recycling tree must be one of {sorted(RECYCLING_TREES)}"
                )
            tree = RECYCLING_TREES[tree]
        if any(
            not -1 <= parent < i or not 0 <= rank < top_k for i, (parent, rank) in enumerate(tree)
        ):
            raise SparseLLMError(
                f"a token-recycling tree lists parents first and ranks below top_k={top_k}"
            )
        self.top_k = top_k
        self.tree = tree
        self.adj = torch.full((vocab, top_k), -1, dtype=torch.int64)
        self.nodes: list[int] = []

    def propose(self, context: list[int], k: int, sample: Any) -> Tree:
        out = Tree()
        placed: list[int] = []  # tree position -> its index in `out` (-1: not placed)
        depth: list[int] = []
        self.nodes = []
        for i, (parent, rank) in enumerate(self.tree):
            where = -1 if parent < 0 else placed[parent]
            d = 0 if parent < 0 else depth[parent] + 1
            prev = context[-1] if parent < 0 else (out.tokens[where] if where >= 0 else -1)
            token = int(self.adj[prev, rank]) if prev >= 0 and d < k else -1
            placed.append(out.add(token, where) if token >= 0 else -1)
            if token >= 0:
                self.nodes.append(i)
            depth.append(d)
        return out

    def update(self, context: list[int], inputs: list[int], logits: torch.Tensor) -> None:
        self.adj[torch.tensor(inputs)] = logits.topk(self.top_k, dim=-1).indices


class ModelDraft(Draft):
    """A model on a runtime: the target itself with activation sparsity (`shares_cache`:
    its steps skip channels and write the shared cache row, which the verification pass
    then rewrites), the target's blocks packed in another format on a runtime of their
    own over the target's cache (`target`), or another model with its own runtime and
    cache."""

    def __init__(
        self, rt: Any, sparse: bool, shares_cache: bool, vocab: torch.Tensor | None = None,
        full_vocab: int = 0, head: torch.nn.Module | None = None, copy_n: int = 0,
        target: Any = None,
    ) -> None:  # fmt: skip
        """`vocab`: the token ids of the rows of a reduced LM head (`reduce_head`), of a
        vocabulary of `full_vocab` tokens; with the full `head` given, each prompt's own
        tokens join those rows (names and code identifiers a corpus ranks low are the
        tokens a continuation repeats). `copy_n` > 0: a pass whose context's last
        `copy_n` tokens occurred before copies what followed them (prompt lookup) instead
        of running the model: those tokens cost no draft step, and a model with a cache of
        its own catches up on the accepted ones in one pass of several rows when it next
        drafts. `target`:
        the target's runtime, whose KV cache this draft's own runtime (the target's
        blocks in another format) attends over (`DecodeRuntime.share_cache`), so after a
        pass it feeds one token, not every accepted one."""
        self.rt, self.sparse, self.shares_cache = rt, sparse, shares_cache or target is not None
        self.target = target
        self.vocab, self.full_vocab, self.head = vocab, full_vocab, head
        self.copy_n = copy_n
        self.copied = 0  # passes drafted by copying
        self.static = vocab
        self.valid = 0  # context tokens whose KV entries the draft's cache holds
        self.seq = 0  # the cache row it drafts on
        self.batched = False  # one of several sequences sharing the runtime (`for_rows`)

    def for_rows(self, rows: int) -> list[Draft]:
        """One draft per cache row, sharing the runtime (its own is reset to `rows` rows;
        a reduced head stays the corpus's, as rows decode different prompts at once)."""
        if self.target is not None:
            self.rt.share_cache(self.target)
        elif not self.shares_cache:
            self.rt.reset(rows)
        if self.head is not None and self.vocab is not self.static:  # a prompt's rows in it
            reduce_head(self.rt, self.head, self.static)
        out: list[Draft] = []
        for r in range(rows):
            d = copy.copy(self)
            d.seq, d.batched, d.head, d.vocab = r, True, None, self.static
            out.append(d)
        return out

    def prompt(self, ids: torch.Tensor) -> None:
        if self.head is not None and self.static is not None:  # set together (FR-Spec)
            self.vocab = torch.unique(torch.cat([self.static, ids[0]]))
            reduce_head(self.rt, self.head, self.vocab)
        if self.shares_cache:  # the target's prefill fills the cache row (a packed
            # draft binds the target's new tensors in `draft_together`, before it steps)
            self.valid = ids.shape[1]
            return
        if not self.batched:
            self.rt.reset(1)
        self.valid = ids.shape[1] - 1  # the last prompt token is fed by `propose`
        if self.valid:
            self.rt.forward(ids[:, :-1], 0, self.sparse, last_only=True, seq=self.seq)

    def propose(self, context: list[int], k: int, sample: Any) -> Tree:
        return draft_together([self], [context], [k], [sample])[0]

    def _pick(self, logits: torch.Tensor, sample: Any) -> tuple[int, torch.Tensor | None]:
        """`sample` over the head's rows, as a token id and (sampling) a distribution over
        the whole vocabulary (zero off the reduced head: rejection stays exact)."""
        token, q = sample(logits)
        if self.vocab is None:
            return token, q
        if q is not None:
            q = torch.zeros(self.full_vocab, dtype=q.dtype).index_copy_(0, self.vocab, q)
        return int(self.vocab[token]), q

    def update(self, context: list[int], inputs: list[int], logits: torch.Tensor) -> None:
        # valid: everything before the new last token (its own KV comes with the next pass)
        self.valid = len(context) - 1 if self.shares_cache else min(self.valid, len(context) - 1)


def _feed_rows(drafts: list[ModelDraft], feeds: list[tuple[list[int], int]]) -> list[torch.Tensor]:
    """One step of the drafts' shared runtime: draft i feeds tokens feeds[i][0] at slots
    feeds[i][1], +1, ... of its cache row (the weights are read once for every row);
    each draft's last row's logits."""
    seq = torch.tensor([d.seq for d, (ts, _) in zip(drafts, feeds, strict=True) for _ in ts])
    pos = torch.cat([torch.arange(at, at + len(ts)) for ts, at in feeds])
    out = drafts[0].rt.step(torch.tensor([t for ts, _ in feeds for t in ts]), seq, pos, pos,
                            drafts[0].sparse)  # fmt: skip
    ends = torch.tensor([len(ts) for ts, _ in feeds]).cumsum(0) - 1
    return list(out[ends])


def draft_together(
    drafts: list[ModelDraft], contexts: list[list[int]], ks: list[int], samples: list[Any]
) -> list[Tree]:
    """Each model draft's chain of up to ks[i] tokens after contexts[i], picked by
    samples[i]. Drafts on one runtime (a batching server's `for_rows` copies, each on its
    own cache row) take their steps together, a row per draft per step, so the draft's
    weights are read once per step for all of them rather than once per request; the
    kernels are batch-invariant, so each chain is the one its draft makes alone.

    A draft with `copy_n` whose context's last tokens occurred before copies what
    followed them instead (no step). The others first feed the accepted tokens they
    have not fed, the last one included (one token on a shared cache), in steps of up
    to MAX_ROWS rows each, then one token per step."""
    trees: list[Tree] = [Tree() for _ in drafts]
    live: list[int] = []
    for i, (d, context, k) in enumerate(zip(drafts, contexts, ks, strict=True)):
        if k <= 0:
            continue
        repeat = copy_after(context, d.copy_n, k) if 0 < d.copy_n < len(context) else []
        if len(repeat) >= min(k, 2):
            d.copied += 1
            trees[i] = chain(repeat, copied=True)
        else:
            live.append(i)
    # a target reset since the last pass gave the shared cache new tensors (once per
    # runtime: a server's lanes share one)
    shared = {id(drafts[i].rt): drafts[i] for i in live if drafts[i].target is not None}
    for d in shared.values():
        d.rt.share_cache(d.target)
    logits: dict[int, torch.Tensor] = {}
    # the last context token is always fed: it gives the first draft token's logits
    at = {i: min(drafts[i].valid, len(contexts[i]) - 1) for i in live}
    while any(at[i] < len(contexts[i]) for i in live):
        group = [i for i in live if at[i] < len(contexts[i])]
        feeds = [(contexts[i][at[i] : at[i] + MAX_ROWS], at[i]) for i in group]
        for i, row in zip(group, _feed_rows([drafts[i] for i in group], feeds), strict=True):
            logits[i] = row
            at[i] += MAX_ROWS
    tokens: dict[int, list[int]] = {i: [] for i in live}
    qs: dict[int, list[torch.Tensor]] = {i: [] for i in live}
    for step in range(max((ks[i] for i in live), default=0)):
        group = [i for i in live if step < ks[i]]
        for i in group:
            token, q = drafts[i]._pick(logits[i], samples[i])
            tokens[i].append(token)
            if q is not None:
                qs[i].append(q)
        group = [i for i in group if step < ks[i] - 1]
        if group:
            feeds = [([tokens[i][-1]], len(contexts[i]) + step) for i in group]
            rows = _feed_rows([drafts[i] for i in group], feeds)
            logits.update(zip(group, rows, strict=True))
    for i in live:
        drafts[i].valid = len(contexts[i]) - 1 + ks[i]  # the root and all but the last token
        trees[i] = chain(tokens[i], qs[i] or None)
    return trees


@dataclass
class Stats:
    """What a speculative generation measured."""

    passes: int = 0
    emitted: int = 0
    drafted: int = 0
    accepted: int = 0
    decode_s: float = 0.0
    prefill_s: float = 0.0
    draft_s: float = 0.0

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "passes": self.passes,
            "accepted_per_step": self.emitted / self.passes if self.passes else None,
            "acceptance_rate": self.accepted / self.drafted if self.drafted else None,
            "drafted": self.drafted,
            "draft_tok_s": self.drafted / self.draft_s if self.draft_s > 0 else None,
        }


def _visible(tree: Tree, pos: int) -> torch.Tensor:
    """(1 + nodes, pos + 1 + nodes) bool: every row sees the prefix and the root (slots
    0..pos); node i also sees its ancestors' slots and its own."""
    n = len(tree.tokens)
    vis = torch.zeros(1 + n, pos + 1 + n, dtype=torch.bool)
    vis[:, : pos + 1] = True
    for i, parent in enumerate(tree.parents):
        vis[1 + i, pos + 1 + i] = True
        if parent >= 0:
            vis[1 + i] |= vis[1 + parent]
    return vis


@dataclass
class Pass:
    """A lane's rows of one verification pass: its last token then the draft's nodes, at
    cache slots `at` of row `seq`, rotated as `rope`; `visible` (rows, slots) for a tree
    (None for a chain: each row sees the slots up to its own)."""

    tokens: list[int]
    seq: int
    at: torch.Tensor
    rope: torch.Tensor
    visible: torch.Tensor | None


class Lane:
    """One sequence's speculative decoding on cache row `seq` of the target's runtime:
    `start` prefills the prompt and picks the first token, then each pass is `plan` (the
    draft proposes), one `DecodeRuntime.step` over `Pass` rows (this lane's alone, or
    several lanes' together in a batching server: rows never interact), and `settle`
    (accept, roll the cache back, tell the draft). `stream` drives a lane alone.

    Tokens are the target's own: greedy at temperature 0, else sampled from its
    distribution. `sparse` runs the target with its own activation sparsity (the output is
    then that sparse model's). `switch=False` drafts on every pass (`Pacer`: its
    timing-based choice is off, e.g. for reproducible tests)."""

    def __init__(
        self,
        rt: Any,
        draft: Draft,
        max_new_tokens: int,
        seq: int = 0,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop: frozenset[int] = frozenset(),
        stats: Stats | None = None,
        sparse: bool = False,
        max_draft: int = 8,
        switch: bool = True,
    ) -> None:
        self.rt, self.draft, self.seq, self.sparse = rt, draft, seq, sparse
        self.max_new, self.stop = max_new_tokens, stop
        self.temperature, self.top_p = temperature, top_p
        self.greedy = temperature <= 0
        self.gen = torch.Generator().manual_seed(seed)
        self.stats = stats if stats is not None else Stats()
        self.pace = Pacer(max_draft, switch=switch)
        self.context: list[int] = []
        self.emitted = 0
        self.done = False
        self._tree, self._room, self._t1 = Tree(), 0, 0.0

    def _pick_draft(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        if self.greedy:
            return int(logits.argmax()), None
        q = target_probs(logits, self.temperature, self.top_p)
        return int(torch.multinomial(q, 1, generator=self.gen)), q

    def start(self, ids: torch.Tensor) -> int:
        """Prefill the prompt `ids` (1, P) into the lane's cache row; the first token."""
        if ids.shape[1] + self.max_new + MAX_ROWS > self.rt.max_len:
            raise ValueError(
                f"{ids.shape[1]} prompt + {self.max_new} new tokens exceed the context"
            )
        self.draft.prompt(ids)
        t0 = time.perf_counter()
        logits = self.rt.forward(ids, 0, self.sparse, last_only=True, seq=self.seq)[0, -1]
        self.stats.prefill_s = time.perf_counter() - t0
        first = self._pick_draft(logits)[0]
        self.context = [*ids[0].tolist(), first]
        self.emitted = 1
        self.done = first in self.stop or self.max_new == 1
        return first

    def plan(self, nodes: int = MAX_ROWS - 1) -> Pass:
        """Draft this pass's tokens, at most `nodes` of them (lanes sharing a pass split
        its rows); the rows the target must check."""
        return plan_lanes([self], nodes)[0]

    def _room_for(self, nodes: int) -> int:
        """Start a pass: how many tokens to draft (the pacer's length, within budget)."""
        self._t1 = time.perf_counter()
        self._room = min(self.pace.next_k(), self.max_new - self.emitted - 1, nodes)
        return self._room

    def _pass(self, tree: Tree, nodes: int, draft_s: float) -> Pass:
        """The pass's rows for the drafted `tree`."""
        self.stats.draft_s += draft_s
        pos = len(self.context) - 1  # slot of the last token, not yet in the cache
        self._tree = tree = _trim(tree, nodes)
        at = torch.arange(pos, pos + 1 + len(tree.tokens))
        if tree.is_chain():
            return Pass([self.context[-1], *tree.tokens], self.seq, at, at, None)
        rope = pos + torch.tensor([0, *[1 + d for d in tree.depth()]])
        return Pass([self.context[-1], *tree.tokens], self.seq, at, rope, _visible(tree, pos))

    def settle(self, rows: torch.Tensor) -> list[int]:
        """Given the target's logits for the planned rows, the tokens this pass emits (the
        accepted draft tokens and one of the target's own), up to a stop token or the
        budget; the cache keeps the accepted path."""
        tree, n = self._tree, len(self._tree.tokens)
        pos = len(self.context) - 1
        # walk the tree from the root: accept while a child matches the target's pick
        node, path, out = -1, [], []
        while True:
            row = rows[node + 1]
            kids = [(i, tree.tokens[i]) for i in range(n) if tree.parents[i] == node]
            if self.greedy:
                token = int(row.argmax())
                child = next((i for i, t in kids if t == token), -1)
            else:
                p = target_probs(row, self.temperature, self.top_p)
                child, token = accept_node(p, kids, tree.q, self.gen)
            out.append(token)
            if child < 0 or token in self.stop:
                break
            path.append(child)
            node = child
        self.rt.move_slots(self.seq, [pos + 1 + i for i in path], pos + 1)
        st = self.stats
        st.passes += 1
        st.drafted += n
        st.accepted += len(path)
        emitted: list[int] = []
        for token in out:
            self.context.append(token)
            self.emitted += 1
            st.emitted += 1
            emitted.append(token)
            if token in self.stop or self.emitted >= self.max_new:
                self.done = True
                break
        self.draft.update(self.context, [self.context[pos], *tree.tokens], rows)
        seconds = time.perf_counter() - self._t1
        st.decode_s += seconds
        self.pace.record(self._room, len(path), len(out), seconds, learn=not tree.copied)
        return emitted

    def stream(self, ids: torch.Tensor) -> Iterator[int]:
        """Decode the prompt `ids` (1, P) alone on cache row 0 (the runtime is reset to
        one row): the first token, then up to `max_new_tokens` in all, a pass's worth at a
        time. Row 0 only, because a model draft not copied by `for_rows` drafts on its own
        row 0."""
        if self.seq != 0:
            raise SparseLLMError("Lane.stream decodes alone, on cache row 0 (seq=0)")
        self.rt.reset(1)
        yield self.start(ids)
        while not self.done:
            p = self.plan()
            n = len(p.tokens)
            rows = self.rt.step(torch.tensor(p.tokens), torch.zeros(n, dtype=torch.int64), p.at,
                                p.rope, self.sparse, p.visible)  # fmt: skip
            yield from self.settle(rows)


def plan_lanes(lanes: list[Lane], nodes: int = MAX_ROWS - 1) -> list[Pass]:
    """Each lane's pass of at most `nodes` draft tokens. Lanes whose model drafts share
    one runtime draft together (`draft_together`); other drafts propose lane by lane.
    The drafting time is split evenly over the lanes that drafted; a lane that did not
    draft starts its pass's clock after them (its pacer times plain passes)."""
    t0 = time.perf_counter()
    rooms = [lane._room_for(nodes) for lane in lanes]
    trees: list[Tree] = [Tree() for _ in lanes]
    groups: dict[int, list[int]] = {}
    for i, lane in enumerate(lanes):
        if rooms[i] <= 0:
            continue
        if isinstance(lane.draft, ModelDraft):
            groups.setdefault(id(lane.draft.rt), []).append(i)
        else:
            trees[i] = lane.draft.propose(lane.context, rooms[i], lane._pick_draft)
    for group in groups.values():
        made = draft_together(
            [cast(ModelDraft, lanes[i].draft) for i in group],
            [lanes[i].context for i in group],
            [rooms[i] for i in group],
            [lanes[i]._pick_draft for i in group],
        )
        for i, tree in zip(group, made, strict=True):
            trees[i] = tree
    t1 = time.perf_counter()
    share = (t1 - t0) / max(sum(r > 0 for r in rooms), 1)
    for lane, room in zip(lanes, rooms, strict=True):
        if room <= 0:
            lane._t1 = t1
    return [
        lane._pass(tree, nodes, share if room > 0 else 0.0)
        for lane, tree, room in zip(lanes, trees, rooms, strict=True)
    ]


class Pacer:
    """Each pass's draft length. While drafting: one more than the running mean of
    accepted draft tokens (SWIFT/ADED-style). Whether to draft at all: a pass of n rows
    costs more than a step here (a fraction of one per extra row on the CPUs measured), so
    a draft that is rarely right makes decoding slower; the pacer keeps running means of
    tokens per second with and without drafting, uses the faster mode, and tries the
    other every `probe` passes (text that starts repeating itself turns drafting back on).
    """

    def __init__(self, max_draft: int, probe: int = 16, switch: bool = True) -> None:
        self.max_draft, self.probe, self.switch = max_draft, probe, switch
        self.mean_accepted = 2.0
        self.rate: dict[bool, float | None] = {True: None, False: None}
        self.passes = 0

    def next_k(self) -> int:
        self.passes += 1
        fast, slow = self.rate[True], self.rate[False]
        drafting = not self.switch or fast is None or slow is None or fast >= slow
        # the 2nd pass, then one every `probe`, tries the other mode
        if self.switch and self.passes % self.probe == 2:
            drafting = not drafting
        return max(1, min(self.max_draft, round(self.mean_accepted) + 1)) if drafting else 0

    def record(
        self, k: int, accepted: int, tokens: int, seconds: float, learn: bool = True
    ) -> None:
        """A pass drafted `k` tokens (0: none) of which `accepted` were; `learn=False`
        keeps its acceptance out of the draft length (the pass still counts as drafting
        for the speed of each mode)."""
        if k > 0 and learn:
            self.mean_accepted = 0.5 * self.mean_accepted + 0.5 * accepted
        rate, old = tokens / max(seconds, 1e-9), self.rate[k > 0]
        self.rate[k > 0] = rate if old is None else 0.7 * old + 0.3 * rate


def _trim(tree: Tree, limit: int) -> Tree:
    """The first `limit` nodes (parents precede children, so it stays a tree)."""
    if len(tree.tokens) <= limit:
        return tree
    q = None if tree.q is None else tree.q[:limit]
    return Tree(tree.tokens[:limit], tree.parents[:limit], q, tree.copied)


def build_draft(spec: str, rt: Any, loaded: Any, load: Callable[[str], Any] | None = None) -> Draft:
    """A draft from its `--draft` spec: lookup, ngram[:n=N,width=W,corpus=C],
    token-recycling, self:SPEC (an activation recipe applied to the target), or a model
    directory / hub id loaded with `load` (it must share the target's vocabulary)."""
    name, _, rest = spec.partition(":")
    opts = dict(kv.split("=", 1) for kv in rest.split(",") if "=" in kv) if rest else {}
    if name == "lookup":
        return Lookup(int(opts.get("n", 3)))
    if name == "ngram":
        corpus = None
        if "corpus" in opts:
            from sparsellm.data.corpora import read_text, resolve_corpus

            text = read_text(resolve_corpus(opts["corpus"]))[: int(opts.get("chars", 2_000_000))]
            corpus = loaded.tokenizer(text).input_ids
        return NGram(int(opts.get("n", 3)), int(opts.get("width", 2)), corpus)
    if name == "token-recycling":
        return TokenRecycling(
            rt.lm_head.out_features, int(opts.get("top_k", 3)), opts.get("tree", "small")
        )
    if name == "self":
        parts = self_parts(rest)
        copy_n = copy_length(parts.lookup)  # a bad option fails before any packing
        if parts.recipe and not any(getattr(p, "rule", None) is not None for p in rt.projections()):
            raise SparseLLMError(f"{spec}: call prepare_target before building the runtime")
        if parts.fmt is None and parts.skip is None and parts.vocab is None:
            return ModelDraft(rt, sparse=True, shares_cache=True, copy_n=copy_n)
        return _own_self(parts, rt, loaded, copy_n)
    if load is None:
        raise SparseLLMError(f"unknown draft {spec!r} (lookup, ngram, token-recycling, self:SPEC, "
                             "or a model directory)")  # fmt: skip
    other = load(spec)
    if other.model.get_output_embeddings().weight.shape[0] != rt.lm_head.out_features:
        raise SparseLLMError(f"draft {spec!r} has another vocabulary than the target")
    from sparsellm.runtime.decode import DecodeRuntime

    drt = DecodeRuntime(other.model, max_len=rt.max_len, packed=getattr(other, "packed", None))
    drt.release_model_weights()
    return ModelDraft(drt, sparse=True, shares_cache=False)


class SelfSpec(NamedTuple):
    """The parts of a ``self:`` draft spec (None: absent)."""

    fmt: str | None
    skip: dict[str, str] | None
    recipe: str | None
    vocab: dict[str, str] | None = None
    lookup: dict[str, str] | None = None


SELF_OPTIONS = ("skip", "vocab", "lookup")  # the `self:` parts written NAME[:KEY=VALUE,...]


def self_parts(rest: str) -> SelfSpec:
    """Split a ``self:`` draft spec's rest into its '+'-joined parts, each at most once: a
    packed format (``int8``), a layer skip (``skip:ratio=R[,score=angular|ppl]``), a
    reduced draft vocabulary (``vocab:size=N[,corpus=C]``), prompt lookup first
    (``lookup[:n=N]``, see `ModelDraft`'s `copy_n`) and an activation recipe
    (``teal:sparsity=0.4``). ``self:int8+skip:ratio=0.25+teal:...`` is the target's
    weights in int8, without a quarter of its blocks, skipping channels."""
    fmt = recipe = None
    opts: dict[str, dict[str, str]] = {}
    for part in rest.split("+") if rest else []:
        head, _, tail = part.partition(":")
        if part in PACKED_FORMATS and fmt is None:
            fmt = part
        elif head in SELF_OPTIONS and head not in opts:
            opts[head] = dict(kv.split("=", 1) for kv in tail.split(",") if "=" in kv)
        elif head not in (*PACKED_FORMATS, *SELF_OPTIONS) and recipe is None and part:
            recipe = part
        else:
            raise SparseLLMError(
                f"self:{rest}: one format, one skip, one vocab, one lookup and one recipe at most"
            )
    if fmt is None and not set(opts) - {"lookup"} and recipe is None:
        raise SparseLLMError("self drafts need a recipe, e.g. self:teal:sparsity=0.6")
    return SelfSpec(fmt, opts.get("skip"), recipe, opts.get("vocab"), opts.get("lookup"))


def copy_length(opts: dict[str, str] | None) -> int:
    """A `lookup[:n=N]` part's n-gram length (3; 0 without the part)."""
    if opts is None:
        return 0
    n = opts.get("n", "3")
    if set(opts) - {"n"} or not n.isdigit() or int(n) < 1:
        raise SparseLLMError(f"lookup: takes n=N (an integer >= 1, default 3), not {opts}")
    return int(n)


def frequent_tokens(tokenizer: Any, text: str, size: int) -> torch.Tensor:
    """The `size` token ids most frequent in `text` (ties: lower id first), the tokenizer's
    end-of-sequence id always among them (a draft that cannot end a text drafts past
    every end), sorted ascending."""
    ids = torch.tensor(tokenizer(text).input_ids, dtype=torch.int64)
    vocab = max(int(ids.max()) + 1, getattr(tokenizer, "vocab_size", 0) or 0)
    counts = torch.bincount(ids, minlength=vocab).double()
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int) and 0 <= eos < vocab:
        counts[eos] = float("inf")
    # stable descending sort: equal counts keep ascending ids
    order = torch.sort(-counts, stable=True).indices[: min(size, vocab)]
    return order.sort().values


def draft_vocab(loaded: Any, opts: dict[str, str]) -> torch.Tensor:
    """A `vocab:size=N[,corpus=C,chars=K]` part's token ids: the N most frequent in the first
    K characters of the bundled corpus C (FR-Spec ranks by corpus frequency, Zhao et al.
    2025)."""
    from sparsellm.data.corpora import read_text, resolve_corpus

    unknown = set(opts) - {"size", "corpus", "chars"}
    if unknown or "size" not in opts:
        raise SparseLLMError(f"vocab:{opts}: takes size=N (required), corpus, chars")
    size, full = int(opts["size"]), loaded.model.get_output_embeddings().weight.shape[0]
    if not 0 < size <= full:
        raise SparseLLMError(f"vocab size {size} must lie in [1, {full}]")
    text = read_text(resolve_corpus(opts.get("corpus", "c4")))[: int(opts.get("chars", 2_000_000))]
    return frequent_tokens(loaded.tokenizer, text, size)


def reduce_head(drt: Any, head: torch.nn.Module, ids: torch.Tensor) -> None:
    """Give the draft runtime `drt` an LM head of `head`'s rows `ids` only, packed in the
    draft's format (its embedding keeps every row): a draft step then reads len(ids) of
    the vocabulary's rows."""
    from sparsellm.formats import choose_kind
    from sparsellm.runtime.projections import Proj

    rows = torch.nn.Linear(head.in_features, len(ids), bias=head.bias is not None)
    with torch.no_grad():
        rows.weight.copy_(head.weight[ids])
        if head.bias is not None:
            rows.bias.copy_(head.bias[ids])
    drt.lm_head = Proj.fuse([rows], kind=choose_kind(drt.fmt, rows.weight, head=True))
    drt.lm_head.bind(drt.native)


def skipped_blocks(loaded: Any, opts: dict[str, str]) -> list[int]:
    """The blocks a layer-skipping self draft leaves out (Draft & Verify / SWIFT, with
    depth pruning's training-free scores instead of their search): round(ratio·n) of
    them, lowest first by `score` (``angular``: the angle each block turns the residual
    stream by; ``ppl``: the calibration loss rise when it alone is skipped) on
    `nsamples` c4 windows of `seqlen` tokens."""
    from sparsellm.data.corpora import resolve_corpus, token_windows
    from sparsellm.methods.structured.depth import choose_blocks

    unknown = set(opts) - {"ratio", "score", "nsamples", "seqlen"}
    if unknown or "ratio" not in opts:
        raise SparseLLMError(f"skip:{opts}: takes ratio=R (required), score, nsamples, seqlen")
    ratio, score = float(opts["ratio"]), opts.get("score", "angular")
    if not 0 < ratio < 1:
        raise SparseLLMError(f"skip ratio {ratio} must lie in (0, 1)")
    if score not in ("angular", "ppl"):
        raise SparseLLMError(f"skip score {score!r}: angular or ppl")
    n, seqlen = int(opts.get("nsamples", 8)), int(opts.get("seqlen", 256))
    calib = token_windows(loaded.tokenizer, resolve_corpus("c4"), n, seqlen)
    return choose_blocks(loaded.model, ratio, calib, score).tolist()


def _own_self(parts: SelfSpec, rt: Any, loaded: Any, copy_n: int = 0) -> Draft:
    """The target's weights packed in the spec's format (fp32 without one), without the
    skipped blocks and with the reduced head, on a runtime of their own that attends over
    the target's KV cache; its steps skip channels by the recipe's rules when there is
    one."""
    from sparsellm.models.adapters import block_linears, get_blocks
    from sparsellm.runtime.decode import DecodeRuntime

    fmt = parts.fmt or "fp32"
    blocks = get_blocks(loaded.model)
    weights = [lin.weight for b in blocks for lin in block_linears(b).values()]
    if any(w.numel() == 0 for w in weights):  # released: the target runs packed weights
        raise SparseLLMError(f"self:{fmt} drafts pack a plain (unpacked) target; this one is "
                             "stored packed: export a draft and pass its directory")  # fmt: skip
    keep = None
    if parts.skip is not None:
        gone = set(skipped_blocks(loaded, parts.skip))
        keep = [i for i in range(len(blocks)) if i not in gone]
    drt = DecodeRuntime(loaded.model, max_len=rt.max_len, fmt=fmt, layers=keep)
    head = loaded.model.get_output_embeddings()
    vocab = None
    if parts.vocab is not None:
        vocab = draft_vocab(loaded, parts.vocab)
        reduce_head(drt, head, vocab)
    return ModelDraft(drt, sparse=parts.recipe is not None, shares_cache=False, vocab=vocab,
                      full_vocab=head.weight.shape[0], head=None if vocab is None else head,
                      copy_n=copy_n, target=rt)  # fmt: skip


def prepare_target(spec: str, loaded: Any) -> bool:
    """For a `self:RECIPE` draft, calibrate the activation recipe on the bundled c4 text and
    wrap the loaded model's modules with it, before its runtime is built: the runtime then
    holds the thresholds, its dense path is the target and its sparse path the draft.
    Returns whether the target must now run dense. Other drafts need nothing."""
    name, _, rest = spec.partition(":")
    if name != "self":
        return False
    recipe = self_parts(rest).recipe
    if recipe is None:
        return False
    from sparsellm.config import from_spec
    from sparsellm.data.corpora import resolve_corpus, token_windows
    from sparsellm.methods.activation.apply import sparsify_activations
    from sparsellm.methods.activation.modules import ActSparseLinear

    if any(isinstance(m, ActSparseLinear) for m in loaded.model.modules()):
        raise SparseLLMError("the target already skips channels; draft from a model directory")
    cfg = from_spec(recipe, family="activation")
    calib = token_windows(loaded.tokenizer, resolve_corpus("c4"), cfg.nsamples, cfg.seqlen)
    sparsify_activations(loaded.model, calib, cfg)
    return True
