"""`encode_prefix` keeps exactly the ids the whole text encodes to."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from sparsellm.data.corpora import encode, encode_prefix


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    rng = random.Random(0)
    words = [
        "".join(rng.choice("abcdefgh ,.") for _ in range(rng.randint(1, 9))) for _ in range(300)
    ]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 12))) for _ in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=400, show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_prefix_ids_equal_the_whole_texts(tokenizer: PreTrainedTokenizerFast) -> None:
    rng = random.Random(1)
    lines = [
        "".join(rng.choice("abcdefgh ,.\n") for _ in range(rng.randint(0, 80))) for _ in range(3000)
    ]
    text = "\n".join(lines)
    whole = encode(tokenizer, text)
    assert whole.numel() > 20000
    for need in (1, 7, 100, 2000, 9000, whole.numel() - 5, whole.numel(), whole.numel() + 10):
        got = encode_prefix(tokenizer, text, need)
        assert got.tolist() == whole[:need].tolist(), need


def test_text_without_line_breaks(tokenizer: PreTrainedTokenizerFast) -> None:
    text = "abc def, gh. " * 2000
    assert encode_prefix(tokenizer, text, 50).tolist() == encode(tokenizer, text)[:50].tolist()
