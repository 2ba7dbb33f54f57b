"""Rebuild a SentencePiece-BPE tokenizer from a GGUF file's vocabulary and scores.

Why: transformers (5.x) turns a Gemma GGUF's vocabulary into a *Unigram* tokenizer
(transformers#41494). Gemma's SentencePiece model is BPE, and Unigram segmentation over the
same pieces splits ordinary words into odd pieces: the default wiki perplexity of
Gemma-3-270m reads ~144 through it instead of ~18. The GGUF carries no merge list, only
pieces, scores and types, which is all SentencePiece-BPE needs: it repeatedly joins the
adjacent pair whose concatenation is the best-scored piece in the vocabulary. A BPE merge
list ranked by the merged piece's score reproduces that exactly, so we derive one
(`spm_merges`) and build a `tokenizers` BPE with byte fallback around it.

Token types follow llama.cpp's GGUF convention: 1 normal, 2 unknown, 3 control,
4 user-defined (matched whole before BPE, e.g. newline runs), 5 unused, 6 byte (<0xNN>).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
from transformers import PreTrainedTokenizerFast

SPACE = "\u2581"  # SentencePiece's visible space
NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6


def spm_merges(
    tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]
) -> list[tuple[str, str]]:
    """Every (left, right) split of a normal piece into two vocabulary pieces, best-scored
    merged piece first (ties: lower id first), so BPE's rank order is SentencePiece's."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] in (NORMAL, BYTE)}
    ranked: list[tuple[float, int, int, tuple[str, str]]] = []
    for i, piece in enumerate(tokens):
        if types[i] != NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], i, vocab[left], (left, right)))
    ranked.sort()
    return [pair for *_, pair in ranked]


def spm_bpe_tokenizer(
    tokens: Sequence[str],
    scores: Sequence[float],
    types: Sequence[int],
    special: dict[str, int],
    add_bos: bool = True,
) -> PreTrainedTokenizerFast:
    """A fast tokenizer equal to SentencePiece-BPE over these pieces (no dummy prefix).

    `special` maps 'bos', 'eos', 'unk', 'pad' to ids. Spaces become '▁' and the whole text
    is one BPE sequence, as in SentencePiece (merges can cross nothing but added tokens).
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    names = {k: tokens[v] for k, v in special.items()}
    model = models.BPE(
        vocab=vocab,
        merges=spm_merges(tokens, scores, types),
        unk_token=names.get("unk"),
        byte_fallback=True,
        fuse_unk=True,
    )
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )

    def added(kind: int, special: bool) -> list[AddedToken]:
        return [
            AddedToken(t, normalized=False, special=special)
            for i, t in enumerate(tokens)
            if types[i] == kind
        ]

    tok.add_tokens(added(USER_DEFINED, special=False))  # newline/tab runs: matched whole
    tok.add_special_tokens(added(CONTROL, special=True))
    if add_bos and "bos" in names:
        bos = names["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, special["bos"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=names.get("bos"),
        eos_token=names.get("eos"),
        unk_token=names.get("unk"),
        pad_token=names.get("pad"),
        add_bos_token=add_bos,
    )


def _fields(path: Path) -> dict:
    from gguf import GGUFReader  # memory-maps the file: cheap even for large models

    return GGUFReader(path).fields


def needs_spm_rebuild(path: Path) -> bool:
    """True for a Gemma GGUF with a SentencePiece vocabulary (the transformers bug's case);
    other GGUFs keep transformers' own tokenizer conversion."""
    fields = _fields(path)
    arch = fields["general.architecture"].contents() if "general.architecture" in fields else ""
    model = fields["tokenizer.ggml.model"].contents() if "tokenizer.ggml.model" in fields else ""
    return str(arch).startswith("gemma") and model == "llama"


def gguf_spm_tokenizer(path: Path) -> PreTrainedTokenizerFast | None:
    """The rebuilt tokenizer for a Gemma GGUF (see `needs_spm_rebuild`), else None."""
    if not needs_spm_rebuild(path):
        return None
    fields = _fields(path)

    def value(key: str, default: object = None) -> object:
        return fields[key].contents() if key in fields else default

    keys = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}  # GGUF's names
    special = {
        name: int(value(f"tokenizer.ggml.{key}_token_id"))
        for name, key in keys.items()
        if f"tokenizer.ggml.{key}_token_id" in fields
    }
    return spm_bpe_tokenizer(
        value("tokenizer.ggml.tokens"),
        value("tokenizer.ggml.scores"),
        value("tokenizer.ggml.token_type"),
        special,
        add_bos=bool(value("tokenizer.ggml.add_bos_token", True)),
    )
