"""`sparsellm generate`: text from any model on the CPU decode runtime, streamed.

The model runs as stored: a compressed checkpoint (`sparsellm export`) in its own
format, anything else in fp32 unless ``--format`` packs it on load. Activation sparsity
saved with the model (TEAL, WINA) applies. ``--prompt`` continues the text as given;
``--chat`` wraps it in the model's chat template (one turn), or without ``--prompt``
reads turns from stdin until EOF. Sampling follows transformers: ``--temperature 0``
(default) is greedy, otherwise softmax(logits / T) restricted to the smallest set of
tokens whose probability reaches ``--top-p``, drawn with ``--seed``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from sparsellm.errors import SparseLLMError
from sparsellm.formats import KINDS


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
        "--json",
        action="store_true",
        help="print one JSON object (text, prefill_tok_s, decode_tok_s, format, new_tokens) "
        "instead of streaming",
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


def _stop_ids(model: Any, tok: Any) -> frozenset[int]:
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
    else:
        rt = DecodeRuntime(loaded.model, max_len=max_len, fmt=fmt or "fp32")
        name = fmt or "fp32"
    rt.release_model_weights()
    return rt, name


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    import sparsellm as sl
    from sparsellm.models.adapters import context_window

    _check(args)
    loaded = sl.load(args.model)
    model, tok = loaded.model, loaded.tokenizer
    window = context_window(model) or 4096
    rt, fmt = build_runtime(loaded, args.format, min(window, 4096))
    stop = _stop_ids(model, tok)
    pick = sampler(args.temperature, args.top_p, args.seed)

    def one(text: str, history: list[dict[str, str]] | None, echo: bool) -> dict[str, Any]:
        if history is not None:
            history.append({"role": "user", "content": text})
            ids = tok.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt")
            ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
        else:
            ids = tok(text, return_tensors="pt").input_ids
        room = rt.max_len - ids.shape[1]
        if room < 1:
            raise SparseLLMError(f"the prompt ({ids.shape[1]} tokens) fills the context")
        times: dict[str, float] = {}
        out: list[int] = []
        shown = ""
        for token in rt.stream(
            ids, min(args.max_new_tokens, room), pick, stop, not args.dense, times
        ):
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
        steps = max(len(out) - 1, 0)
        return {
            "text": reply,
            "prefill_tok_s": ids.shape[1] / times["prefill_s"] if times["prefill_s"] else None,
            "decode_tok_s": steps / times["decode_s"] if times["decode_s"] else None,
            "format": fmt,
            "new_tokens": len(out),
        }

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


def _stats(result: dict[str, Any]) -> None:
    rate = result["decode_tok_s"]
    shown = f"{rate:.1f}" if rate else "-"
    print(f"[{result['new_tokens']} tokens, {shown} tok/s decode, {result['format']}]",
          file=sys.stderr)  # fmt: skip
