"""Task logits of a model read block by block equal the in-memory forward's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sparsellm.calib.streamed import streamed_logits
from sparsellm.eval.logits import model_logits
from sparsellm.eval.zeroshot import score_pairs
from sparsellm.models.shards import Checkpoint, skeleton
from sparsellm.models.tiny import byte_tokenizer, tiny_model


def _requests() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 20), (1, 7), (2, 33), (4, 5), (1, 40)]
    out = []
    for b, n in shapes:
        keep = torch.randperm(n, generator=g)[: max(1, n // 3)].sort().values
        out.append((torch.randint(0, 256, (b, n), generator=g), keep))
    return out


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
@pytest.mark.parametrize("tokens_per_pass", [1, 64, 1 << 15])
def test_streamed_logits_equal_the_forward(tmp_path: Path, family: str, tokens_per_pass: int):
    model = tiny_model(family, seed=2, layers=3)
    model.save_pretrained(tmp_path)
    requests = _requests()
    want = list(model_logits(model)(requests))
    got = list(streamed_logits(skeleton(tmp_path), Checkpoint(tmp_path), tokens_per_pass)(requests))
    assert len(got) == len(want)
    for g, w, (ids, keep) in zip(got, want, requests, strict=True):
        assert g.shape == w.shape == (ids.shape[0], len(keep), model.config.vocab_size)
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_zero_shot_scores_streamed_equal_in_memory(tmp_path: Path) -> None:
    model = tiny_model("llama", seed=2, layers=2)
    model.save_pretrained(tmp_path)
    tok = byte_tokenizer()
    pairs = [("The cat sat on the", " mat"), ("1 2 3", " 4 5"), ("a", " b c d"), ("xyz ", "w")]
    want = score_pairs(model, tok, pairs, batch_size=3)
    logits = streamed_logits(skeleton(tmp_path), Checkpoint(tmp_path), tokens_per_pass=16)
    got = score_pairs(skeleton(tmp_path), tok, pairs, batch_size=3, logits=logits)
    for (ll_g, greedy_g), (ll_w, greedy_w) in zip(got, want, strict=True):
        assert ll_g == pytest.approx(ll_w, rel=1e-5) and greedy_g == greedy_w
