"""The SentencePiece-BPE rebuild equals SentencePiece's own greedy merging, and models whose
tokenizer starts texts with BOS get BOS in windows, prompts and zero-shot contexts."""

import random

import pytest
import torch

from sparsellm.data.corpora import bos_prefix, resolve_corpus, token_windows
from sparsellm.eval.zeroshot import encode_pair
from sparsellm.models.gguf_tokenizer import (
    BYTE,
    CONTROL,
    NORMAL,
    SPACE,
    USER_DEFINED,
    gguf_spm_tokenizer,
    needs_spm_rebuild,
    spm_bpe_tokenizer,
    spm_merges,
)

PIECES = ["▁", "a", "b", "c", "h", "e", "l", "o", "bc", "ab", "abc", "he", "ll", "▁h",
          "llo", "hel", "hello", "▁hello", "▁a", "lo"]  # fmt: skip


def tiny_vocab() -> tuple[list[str], list[float], list[int]]:
    """Gemma's layout in miniature: controls, a user-defined newline, bytes, then normal
    pieces whose score falls with their id."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "\n\n"]
    types = [CONTROL] * 4 + [USER_DEFINED]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [BYTE] * 256
    tokens += PIECES
    types += [NORMAL] * len(PIECES)
    scores = [-1000.0] * 4 + [0.0] + [0.0] * 256 + [-float(i) for i in range(len(PIECES))]
    return tokens, scores, types


def reference_spm(text: str, tokens: list[str], scores: list[float], types: list[int]):
    """SentencePiece-BPE by its definition: join the adjacent pair whose concatenation is
    the best-scored normal piece (leftmost on ties) until none is; unknown symbols fall back
    to their UTF-8 bytes."""
    normal = {t: (scores[i], i) for i, t in enumerate(tokens) if types[i] == NORMAL}
    ids = {t: i for i, t in enumerate(tokens)}
    out: list[int] = []
    for part_i, part in enumerate(text.split("\n\n")):
        if part_i:
            out.append(ids["\n\n"])
        syms = list(part.replace(" ", SPACE))
        while True:
            best = None
            for j in range(len(syms) - 1):
                cand = syms[j] + syms[j + 1]
                if cand in normal and (best is None or normal[cand][0] > normal[best[1]][0]):
                    best = (j, cand)
            if best is None:
                break
            j, cand = best
            syms[j : j + 2] = [cand]
        for s in syms:
            out += [ids[s]] if s in normal else [ids[f"<0x{b:02X}>"] for b in s.encode()]
    return out


def test_merges_rank_by_merged_piece_score():
    tokens, scores, types = tiny_vocab()
    merges = spm_merges(tokens, scores, types)
    # 'bc' (better score) before 'ab'; every split of 'abc' and 'hello' into pieces is there
    assert merges.index(("b", "c")) < merges.index(("a", "b"))
    assert {("a", "bc"), ("ab", "c")} <= set(merges)
    assert {("he", "llo"), ("hel", "lo")} <= set(merges) and ("hell", "o") not in merges
    assert all(a + b in PIECES for a, b in merges)


def test_rebuilt_tokenizer_equals_greedy_sentencepiece_bpe():
    tokens, scores, types = tiny_vocab()
    tok = spm_bpe_tokenizer(tokens, scores, types, {"bos": 2, "eos": 1, "unk": 3, "pad": 0})
    rng = random.Random(0)
    texts = ["hello abc", " hello", "abcabc hel\n\nlo", "é hello ü"]
    texts += ["".join(rng.choices("abchelo é\n", k=rng.randint(1, 24))) for _ in range(300)]
    for text in texts:
        ids = tok(text).input_ids
        assert ids[0] == 2, "BOS added as the GGUF says"
        assert ids[1:] == reference_spm(text, tokens, scores, types), text
        assert tok.decode(ids, skip_special_tokens=True) == text
    # by hand: "bc" outranks "▁a", then "abc" (= a + bc) outranks "▁a" too
    assert tok.convert_ids_to_tokens(tok("hello abc").input_ids) == ["<bos>", "hello", "▁", "abc"]


def write_gguf(path, arch: str) -> None:
    gguf = pytest.importorskip("gguf")
    tokens, scores, types = tiny_vocab()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_only_gemma_ggufs_are_rebuilt(tmp_path):
    write_gguf(tmp_path / "g.gguf", "gemma3")
    write_gguf(tmp_path / "l.gguf", "llama")
    assert needs_spm_rebuild(tmp_path / "g.gguf") and not needs_spm_rebuild(tmp_path / "l.gguf")
    assert gguf_spm_tokenizer(tmp_path / "l.gguf") is None
    tok = gguf_spm_tokenizer(tmp_path / "g.gguf")
    tokens, scores, types = tiny_vocab()
    assert tok("abc hello").input_ids[1:] == reference_spm("abc hello", tokens, scores, types)
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == (
        "<bos>", "<eos>", "<unk>", "<pad>"
    )  # fmt: skip


def test_bos_goes_where_the_model_expects_it(tmp_path):
    tokens, scores, types = tiny_vocab()
    special = {"bos": 2, "eos": 1, "unk": 3, "pad": 0}
    with_bos = spm_bpe_tokenizer(tokens, scores, types, special)
    without = spm_bpe_tokenizer(tokens, scores, types, special, add_bos=False)
    assert bos_prefix(with_bos) == [2] and bos_prefix(without) == []
    text = tmp_path / "t.txt"
    text.write_text("hello abc " * 40)
    corpus = resolve_corpus(text)
    plain = token_windows(without, corpus, 3, 8)
    windows = token_windows(with_bos, corpus, 3, 8)
    assert windows.shape == plain.shape == (3, 8)
    assert (windows[:, 0] == 2).all(), "every window starts with BOS"
    assert torch.equal(windows[:, 1:].flatten(), plain.flatten()[:21]), "then contiguous text"
    ctx, cont = encode_pair(with_bos, "hello", " abc")
    assert ctx[0] == 2 and ctx[1:] == encode_pair(without, "hello", " abc")[0]
    assert encode_pair(with_bos, "hello", " abc", bos=False)[0] == ctx[1:]
    assert cont == encode_pair(without, "hello", " abc")[1]
