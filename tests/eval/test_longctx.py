import random
from types import SimpleNamespace

import pytest
import torch

from sparsellm.errors import SparseLLMError
from sparsellm.eval import longctx
from sparsellm.eval.longctx import Sample, answer_correct, build_sample, make_samples
from sparsellm.models.tiny import byte_tokenizer, tiny_model

HAY = list(range(50, 120)) * 200  # byte ids of filler, never digits (48-57 are "0"-"9")


def _text(tok, ids):
    return tok.decode(ids)


@pytest.mark.parametrize("task", longctx.TASKS)
def test_samples_have_the_exact_length_and_hold_their_answer(task):
    tok = byte_tokenizer()
    for length in (600, 900):
        s = build_sample(tok, HAY, task, length, 0.5, random.Random(0))
        assert len(s.prompt) + len(s.answer) - 1 == length
        answer = _text(tok, s.answer).strip()
        assert answer.isdigit() and answer in _text(tok, s.prompt)


def test_needle_sits_at_its_depth():
    tok = byte_tokenizer()
    for depth in (0.0, 0.5, 1.0):
        s = build_sample(tok, HAY, "needle", 1000, depth, random.Random(1))
        text = _text(tok, s.prompt)
        intro_end = len(longctx._INTRO["needle"])
        question = text.rindex("\n\nWhat is the special")
        needle = text.index(" One of the special")
        needle_len = text.index(". ", needle) + 2 - needle
        # filler tokens before the needle / all filler tokens
        where = (needle - intro_end) / (question - intro_end - needle_len)
        assert where == pytest.approx(depth, abs=0.06)


def test_vartrack_chain_is_in_order_with_a_distractor():
    tok = byte_tokenizer()
    s = build_sample(tok, HAY, "vartrack", 1500, 0.3, random.Random(3))
    text = _text(tok, s.prompt)
    asked = text.split("what number is VAR ")[1].split(" ")[0]
    # walk the chain backwards from the asked variable to its number
    var, hops = asked, 0
    while True:
        rhs = text.split(f" VAR {var} = ")[1].split(".")[0]
        if rhs.isdigit():
            break
        prev = rhs.removeprefix("VAR ")
        assert text.index(f"VAR {prev} =") < text.index(f"VAR {var} =")  # defined earlier
        var, hops = prev, hops + 1
    assert hops == 2 and rhs == _text(tok, s.answer).strip()
    assert text.count(" = VAR ") == 4  # two chains of two hops each


def test_samples_are_seeded_and_needle_uses_a_depth_grid():
    tok = byte_tokenizer()
    a = make_samples(tok, "passkey", (600,), 2, seed=0, haystack=HAY)
    b = make_samples(tok, "passkey", (600,), 2, seed=0, haystack=HAY)
    c = make_samples(tok, "passkey", (600,), 2, seed=1, haystack=HAY)
    assert [x.prompt for x in a] == [x.prompt for x in b] != [x.prompt for x in c]
    grid = make_samples(tok, "needle", (600, 800), 5, haystack=HAY)
    assert [s.depth for s in grid] == [0, 0.25, 0.5, 0.75, 1] * 2


class _Oracle(torch.nn.Module):
    """A fake LM that predicts `target[i + 1]` at position i (optionally wrong at one)."""

    def __init__(self, target, wrong_at=None):
        super().__init__()
        self.target, self.wrong_at = target, wrong_at
        self.config = SimpleNamespace(max_position_embeddings=4096)

    def forward(self, input_ids, logits_to_keep, use_cache):
        logits = torch.zeros(1, len(logits_to_keep), 256)
        for j, pos in enumerate(logits_to_keep.tolist()):
            nxt = self.target[pos + 1]
            logits[0, j, (nxt + 1) % 256 if pos == self.wrong_at else nxt] = 1.0
        return SimpleNamespace(logits=logits)


def test_answer_correct_needs_every_answer_token():
    s = Sample("passkey", 10, 0.0, prompt=[1, 2, 3, 4], answer=[5, 6, 7])
    full = s.prompt + s.answer
    assert answer_correct(_Oracle(full), s)
    assert not answer_correct(_Oracle(full, wrong_at=5), s)  # last answer token wrong
    assert answer_correct(_Oracle(full, wrong_at=1), s)  # prompt positions don't count


def test_lengths_beyond_the_window_are_refused():
    model = tiny_model("llama")  # window 512
    with pytest.raises(SparseLLMError, match="exceeds the model's window 512"):
        longctx.check_lengths(model, (256, 1024))
    with pytest.raises(SparseLLMError, match="unknown long-context task"):
        build_sample(byte_tokenizer(), HAY, "nope", 300, 0.5, random.Random(0))


def test_evaluate_longctx_reports_per_length_and_grid(monkeypatch):
    model, tok = tiny_model("llama"), byte_tokenizer()
    model.config.max_position_embeddings = 1024  # rotary: longer than trained is fine here
    monkeypatch.setattr(longctx, "haystack_ids", lambda tokenizer: HAY)
    out = longctx.evaluate_longctx(model, tok, "needle", (600, 800), samples=2)
    assert out["docs"] == 4 and set(out["by_length"]) == {"600", "800"}
    assert set(out["grid"]) == {"600@0.00", "600@1.00", "800@0.00", "800@1.00"}
    items = make_samples(tok, "needle", (600, 800), 2, haystack=HAY)
    hits = [answer_correct(model, s) for s in items]
    assert out["acc"] == sum(hits) / 4
