"""Block-by-block evaluation of a checkpoint equals the in-RAM comparison."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sparsellm.calib.streamed import final_hidden, logprobs
from sparsellm.eval.kl import compare_logprobs, compare_models
from sparsellm.models.shards import Checkpoint, skeleton
from sparsellm.models.tiny import tiny_model


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
def test_streamed_comparison_equals_in_ram(tmp_path: Path, family: str) -> None:
    dense, pruned = tiny_model(family, seed=1), tiny_model(family, seed=1)
    with torch.no_grad():
        for p in pruned.parameters():  # another model with the same head and norm
            if p.dim() == 2 and p.shape[0] != 256:
                p.mul_(torch.rand_like(p) > 0.5)
    assert dense.get_output_embeddings().weight.shape[0] == 256
    dense.save_pretrained(tmp_path / "d")
    pruned.save_pretrained(tmp_path / "s")
    ids = torch.randint(0, 256, (5, 24), generator=torch.Generator().manual_seed(2))
    ref = compare_models(dense, pruned, ids)
    sk_s, ck_s = skeleton(tmp_path / "s"), Checkpoint(tmp_path / "s")
    hidden = [
        final_hidden(skeleton(tmp_path / "d"), Checkpoint(tmp_path / "d"), ids),
        final_hidden(sk_s, ck_s, ids),
    ]
    got = compare_logprobs((t, d, s) for t, (d, s) in logprobs(sk_s, ck_s, ids, hidden))
    for key in ("dense_ppl", "sparse_ppl", "kl", "top1_agreement", "tokens"):
        assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), key
    assert ref["kl"] > 0
    # the skeleton is back to meta: nothing stays in memory
    assert all(p.is_meta for p in sk_s.parameters())


@pytest.mark.parametrize("family", ["qwen2", "gemma3_text"])
def test_compare_to_checkpoint_equals_compare_models(tmp_path: Path, family: str) -> None:
    """The in-RAM prune's comparison without a dense copy: the dense side read from disk."""
    import sparsellm as sl
    from sparsellm.pipeline import compare_to_checkpoint

    dense = tiny_model(family, seed=3)
    dense.save_pretrained(tmp_path / "d")
    pruned = tiny_model(family, seed=3)
    sl.sparsify(pruned, [{"method": "magnitude", "sparsity": 0.6}])
    ids = torch.randint(0, 256, (6, 20), generator=torch.Generator().manual_seed(4))
    ref = compare_models(dense, pruned, ids)
    got = compare_to_checkpoint(pruned, tmp_path / "d", ids)
    for key in ("dense_ppl", "sparse_ppl", "kl", "top1_agreement", "tokens"):
        assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), key
    assert ref["kl"] > 0
