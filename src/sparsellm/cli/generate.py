"""`sparsellm generate`: text from any model on the CPU decode runtime, streamed.

The model runs as stored: a compressed checkpoint (`sparsellm export`) in its own
format, anything else in fp32 unless ``--format`` packs it on load. Activation sparsity
saved with the model (TEAL, WINA) applies. ``--prompt`` continues the text as given;
``--chat`` wraps it in the model's chat template (one turn), or without ``--prompt``
reads turns from stdin until EOF. Sampling follows transformers: ``--temperature 0``
(default) is greedy, otherwise softmax(logits / T) restricted to the smallest set of
tokens whose probability reaches ``--top-p``, drawn with ``--seed``.

``--draft D`` decodes speculatively (see `sparsellm.runtime.speculative`): the draft
proposes tokens, the model checks them in one pass, and the text is the model's own
(greedy: token for token; sampling: the same distribution). With ``--json`` the model
also runs alone on the same prompt first, for ``speedup_vs_target``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import Any

import torch

from sparsellm.errors import SparseLLMError
from sparsellm.formats import KINDS
from sparsellm.runtime.speculative import MAX_ROWS


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text on the CPU runtime (any format), streamed to the terminal",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("--model", default="default", metavar="SRC", help="a model (default: default)")
    p.add_argument("--prompt", default=None, help="text to continue (or the chat turn)")
    p.add_argument("--chat", action="store_true", help="use the chat template")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="default 128")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus mass (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument(
        "--format",
        default=None,
        choices=[k for k in KINDS if k != "fp32"],
        metavar="KIND",
        help="pack a plain model's weights on load (default: as stored)",
    )
    p.add_argument("--dense", action="store_true", help="ignore activation sparsity (dense decode)")
    p.add_argument(
        "--draft",
        default=None,
        metavar="D",
        help="speculative decoding, lossless: lookup (prompt lookup), ngram[:n=3,width=2,"
        "corpus=c4] (retrieval), token-recycling, self:RECIPE (the model with activation "
        "sparsity, e.g. self:teal:sparsity=0.6), self:FORMAT (the model's own weights "
        "packed smaller, e.g. self:int8; self:int8+lookup copies repeats and drafts the "
        "rest), or a model dir / hub id with the same "
        "vocabulary (e.g. a 70%% sparse-int8 export)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (text, prefill_tok_s, decode_tok_s, format, new_tokens; "
        "with --draft also accepted_per_step, draft_tok_s, speedup_vs_target) instead of "
        "streaming",
    )


def sampler(temperature: float, top_p: float, seed: int) -> Any:
    """logits (vocab,) -> token id: greedy at T = 0, else nucleus sampling."""
    if temperature <= 0:
        return lambda logits: int(logits.argmax())
    gen = torch.Generator().manual_seed(seed)

    def pick(logits: torch.Tensor) -> int:
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (at least one token)
            drop = sorted_p.cumsum(0) - sorted_p >= top_p
            sorted_p[drop] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))

    return pick


def stop_ids(model: Any, tok: Any) -> frozenset[int]:
    """Tokens that end a reply: the EOS ids of the model's generation config (chat models
    list their end-of-turn token there) and of the tokenizer."""
    ids = set()
    for source in (getattr(model, "generation_config", None), tok):
        eos = getattr(source, "eos_token_id", None)
        ids |= set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    return frozenset(int(i) for i in ids)


def _check(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise SparseLLMError("--max-new-tokens must be >= 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise SparseLLMError("--temperature must be >= 0 and --top-p in (0, 1]")
    if args.prompt is None and not args.chat:
        raise SparseLLMError("give --prompt TEXT, or --chat to read turns from stdin")
    if args.json and args.prompt is None:
        raise SparseLLMError("--json needs --prompt")


def build_runtime(loaded: Any, fmt: str | None, max_len: int) -> tuple[Any, str]:
    """The decode runtime over a loaded model, packed as stored (or as `fmt`), with the
    model's own copies of packed weights freed; returns it and the format name."""
    from sparsellm.runtime.decode import DecodeRuntime

    if loaded.packed is not None and fmt is not None:
        raise SparseLLMError("--format applies to plain models; this one is stored packed")
    if loaded.packed is not None:
        rt = DecodeRuntime(loaded.model, max_len=max_len, packed=loaded.packed)
        name = loaded.info.get("format", "packed")
        loaded.packed = None  # the runtime holds the weights (tiles may have replaced rows)
    else:
        rt = DecodeRuntime(loaded.model, max_len=max_len, fmt=fmt or "fp32")
        name = fmt or "fp32"
    rt.release_model_weights()
    return rt, name


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    import sparsellm as sl
    from sparsellm.models.adapters import context_window
    from sparsellm.runtime.speculative import Stats, build_draft, prepare_target

    _check(args)
    loaded = sl.load(args.model)
    model, tok = loaded.model, loaded.tokenizer
    window = context_window(model) or 4096
    dense_target = prepare_target(args.draft, loaded) if args.draft else False
    rt, fmt = build_runtime(loaded, args.format, min(window, 4096))
    draft = build_draft(args.draft, rt, loaded, load=sl.load) if args.draft else None
    sparse = not (args.dense or dense_target)
    stop = stop_ids(model, tok)

    def decode(ids: torch.Tensor, n: int, times: dict[str, float], spec: bool) -> Any:
        if not spec:
            pick = sampler(args.temperature, args.top_p, args.seed)
            return rt.stream(ids, n, pick, stop, sparse, times)
        stats = times["stats"] = Stats()
        return _speculative(rt, draft, ids, n, args, stop, stats, sparse, times)

    def one(text: str, history: list[dict[str, str]] | None, echo: bool) -> dict[str, Any]:
        if history is not None:
            history.append({"role": "user", "content": text})
            ids = tok.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt")
            ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
        else:
            ids = tok(text, return_tensors="pt").input_ids
        room = rt.max_len - ids.shape[1] - (MAX_ROWS if draft else 0)
        if room < 1:
            raise SparseLLMError(f"the prompt ({ids.shape[1]} tokens) fills the context")
        n = min(args.max_new_tokens, room)
        alone: dict[str, Any] = {}
        if draft is not None and args.json:  # the model alone, for the speedup
            alone["times"] = {}
            alone["tokens"] = [t for t in decode(ids, n, alone["times"], False) if t not in stop]
        times: dict[str, Any] = {}
        out: list[int] = []
        shown = ""
        for token in decode(ids, n, times, draft is not None):
            if token in stop:
                break
            out.append(token)
            if echo:
                text_now = tok.decode(out, skip_special_tokens=True)
                print(text_now[len(shown) :], end="", flush=True)
                shown = text_now
        if echo:
            print(flush=True)
        reply = tok.decode(out, skip_special_tokens=True)
        if history is not None:
            history.append({"role": "assistant", "content": reply})
        result = {
            "text": reply,
            "prefill_tok_s": ids.shape[1] / times["prefill_s"] if times["prefill_s"] else None,
            "decode_tok_s": _rate(len(out), times["decode_s"]),
            "format": fmt,
            "new_tokens": len(out),
        }
        if draft is not None:
            result.update(_draft_keys(times["stats"], result["decode_tok_s"], alone))
        return result

    history: list[dict[str, str]] | None = [] if args.chat else None
    if args.prompt is not None:
        if not args.json and history is None:
            print(args.prompt, end="", flush=True)
        result = one(args.prompt, history, echo=not args.json)
        if not args.json:
            _stats(result)
        return result if args.json else None
    print(f"chat with {args.model} ({fmt}); end with Ctrl-D", file=sys.stderr)
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return None
        if line.strip():
            _stats(one(line.strip(), history, echo=True))


def _rate(tokens: int, seconds: float) -> float | None:
    """Decode tok/s: tokens after the first (which comes from the prompt pass)."""
    return max(tokens - 1, 0) / seconds if seconds else None


def _speculative(
    rt: Any,
    draft: Any,
    ids: torch.Tensor,
    n: int,
    args: argparse.Namespace,
    stop: frozenset[int],
    stats: Any,
    sparse: bool,
    times: dict[str, Any],
) -> Iterator[int]:
    """A speculative `Lane`'s stream with the timings `rt.stream` reports (prefill_s,
    decode_s)."""
    from sparsellm.runtime.speculative import Lane

    times["prefill_s"] = times["decode_s"] = 0.0
    lane = Lane(rt, draft, n, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                stop=stop, stats=stats, sparse=sparse)  # fmt: skip
    for token in lane.stream(ids):
        times["prefill_s"], times["decode_s"] = stats.prefill_s, stats.decode_s
        yield token
    times["prefill_s"], times["decode_s"] = stats.prefill_s, stats.decode_s


def _draft_keys(stats: Any, rate: float | None, alone: dict[str, Any]) -> dict[str, Any]:
    """The --json keys of a speculative run; the speedup needs the model-alone run."""
    keys = stats.as_dict()
    out: dict[str, Any] = {
        "accepted_per_step": keys["accepted_per_step"],
        "acceptance_rate": keys["acceptance_rate"],
        "draft_tok_s": keys["draft_tok_s"],
        "speedup_vs_target": None,
    }
    if alone:
        target = _rate(len(alone["tokens"]), alone["times"]["decode_s"])
        out["target_decode_tok_s"] = target
        out["speedup_vs_target"] = rate / target if rate and target else None
    return out


def _stats(result: dict[str, Any]) -> None:
    rate = result["decode_tok_s"]
    shown = f"{rate:.1f}" if rate else "-"
    print(f"[{result['new_tokens']} tokens, {shown} tok/s decode, {result['format']}]",
          file=sys.stderr)  # fmt: skip
