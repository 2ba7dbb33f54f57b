"""Slice-wise log-probabilities equal the full forward (to rounding), for every family."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sparsellm.models.replay as replay
from sparsellm.models.tiny import FAMILIES, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_slices_equal_full_forward(family: str) -> None:
    model = tiny_model(family)
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0))
    full = F.log_softmax(model(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)
    blocks = list(replay.get_blocks(model))
    hidden = replay.last_block_output(model, ids)
    # several slices of a 256 vocab
    slices = list(replay.slice_logprobs(model, [hidden, hidden], ids, elements=2000))
    assert len(slices) > 2
    got = torch.cat([lp[0].view(3, -1, 256) for _, lp in slices], 1)
    targets = torch.cat([t.view(3, -1) for t, _ in slices], 1)
    # to rounding: BLAS picks its kernel by shape, so a slice's head matmul may round
    # differently from the full one's (1 ulp on an AMD EPYC's MKL; bit-equal on a Xeon)
    torch.testing.assert_close(got, full, rtol=0, atol=4e-6)
    second = torch.cat([lp[1].view(3, -1, 256) for _, lp in slices], 1)
    torch.testing.assert_close(second, full, rtol=0, atol=4e-6)
    assert torch.equal(targets, ids[:, 1:])
    # the model is left as it was: its blocks are back
    assert list(replay.get_blocks(model)) == blocks


def test_wrappers_are_not_replayable() -> None:
    from sparsellm.recover.prompt import PromptedLM

    model = tiny_model("llama")
    assert replay.replayable(model) and not replay.replayable(PromptedLM(model, 2))
