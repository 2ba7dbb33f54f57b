"""LongHeads: rotary bookkeeping, chunk representations and selection, the remapped
attention against a loop reference, and the model integration."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sparsellm.errors import SparseLLMError
from sparsellm.integrations.transformers import sparse_attention
from sparsellm.methods.attention.longheads import LongHeads, chunk_keys, select_chunks
from sparsellm.methods.attention.rope import rope_angles, rotate
from sparsellm.models.tiny import tiny_config, tiny_model

G = torch.Generator().manual_seed(0)


def test_rotation_matches_transformers_and_inverts() -> None:
    model = tiny_model("llama", 0)
    d = model.config.hidden_size // model.config.num_attention_heads
    x = torch.randn(1, 2, 10, d, generator=G)
    pos = torch.arange(10)
    cos, sin = model.model.rotary_emb(x, pos[None])
    angles = rope_angles(pos, model.config.rope_parameters["rope_theta"], d)
    torch.testing.assert_close(angles.cos().float(), cos[0])
    torch.testing.assert_close(angles.sin().float(), sin[0])
    torch.testing.assert_close(rotate(rotate(x, angles), -angles), x, atol=1e-6, rtol=1e-6)
    # a rotation keeps only the relative position in a dot product
    q, k = torch.randn(d, generator=G), torch.randn(d, generator=G)
    a = rope_angles(torch.tensor([7, 3, 104, 100]), 10000.0, d)
    near = rotate(q, a[0]) @ rotate(k, a[1])
    far = rotate(q, a[2]) @ rotate(k, a[3])
    torch.testing.assert_close(near, far, atol=1e-4, rtol=1e-4)


def test_chunk_keys_by_hand() -> None:
    # one chunk of two keys; the mean query prefers key 1 by a logit gap of 2·ln 3
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0]])[None, None]
    q = torch.tensor([[0.0, 2 * math.log(3) * math.sqrt(2)]] * 2)[None, None, None]
    rep = chunk_keys(q, k, 2)  # softmax over (0, 2 ln 3) = (0.1, 0.9)
    torch.testing.assert_close(rep[0, 0, 0], torch.tensor([0.1, 0.9]))


def test_selection_forces_sink_and_local_and_picks_the_match() -> None:
    n, d = 8, 4
    reps = torch.randn(1, 1, n, d, generator=G) * 0.01
    reps[0, 0, 3] = torch.tensor([5.0, 0, 0, 0])
    q = torch.zeros(1, 1, 1, n, d)
    q[..., 0] = 1.0  # every chunk's queries look for chunk 3's content
    chosen = select_chunks(q, reps, 4)
    assert chosen[0, 0, 7].tolist() == [0, 3, 6, 7]
    assert chosen[0, 0, 5].tolist() == [0, 3, 4, 5]
    assert chosen[0, 0, 1].tolist() == [0, 1, 1, 1], "too few chunks: repeats of its own"


def _reference(query, key, value, m: LongHeads, scale: float) -> torch.Tensor:
    """Token by token: un-rotate, pick the chunks, re-rotate at slot positions, attend."""
    _, hq, length, d = query.shape
    g = hq // key.shape[1]
    w, slots = m.block, m.length // m.block
    undo = -rope_angles(torch.arange(length), m.theta, d)
    q_pre, k_pre = rotate(query, undo), rotate(key, undo)
    chosen = m._select(query, key)[2]
    out = torch.zeros_like(query)
    for h in range(hq):
        for t in range(length):
            i = t // w
            if t < slots * w:
                s = (query[0, h, t] @ key[0, h // g, : t + 1].T) * scale
                out[0, h, t] = torch.softmax(s, -1) @ value[0, h // g, : t + 1]
                continue
            ks, vs = [], []
            for slot, c in enumerate(chosen[0, h // g, i].tolist()):
                span = range(c * w, min((c + 1) * w, t + 1 if c == i else length))
                pos = torch.tensor([slot * w + (j - c * w) for j in span])
                ks.append(rotate(k_pre[0, h // g, list(span)], rope_angles(pos, m.theta, d)))
                vs.append(value[0, h // g, list(span)])
            qpos = torch.tensor([(slots - 1) * w + t - i * w])
            qt = rotate(q_pre[0, h, t][None], rope_angles(qpos, m.theta, d))[0]
            s = (qt @ torch.cat(ks).T) * scale
            out[0, h, t] = torch.softmax(s, -1) @ torch.cat(vs)
    return out


def test_attend_matches_the_token_loop_reference() -> None:
    m = LongHeads(length=12, block=4, min_length=8, theta=10000.0)
    d, length = 8, 30  # 8 chunks (the last one partial), 3 slots
    angles = rope_angles(torch.arange(length), m.theta, d)
    query = rotate(torch.randn(1, 4, length, d, generator=G), angles)
    key = rotate(torch.randn(1, 2, length, d, generator=G), angles)
    value = torch.randn(1, 2, length, d, generator=G)
    got = m.attend(query, key, value, d**-0.5, 0)
    torch.testing.assert_close(got, _reference(query, key, value, m, d**-0.5), atol=1e-5, rtol=1e-4)
    dense = F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(got[:, :, :12], dense[:, :, :12], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got[:, :, 12:], dense[:, :, 12:], atol=1e-3)
    whole = LongHeads(length=32, block=4, min_length=8, theta=10000.0)
    torch.testing.assert_close(whole.attend(query, key, value, d**-0.5, 0), dense)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_in_a_model_the_window_is_exact_and_the_rest_reads_chunks(family: str) -> None:
    model = tiny_model(family, 0)
    ids = torch.randint(0, 256, (1, 96), generator=G)
    with torch.no_grad():
        dense = model(ids).logits
        with sparse_attention(model, "longheads:length=48,block=16,min_length=32") as s:
            assert s.method.theta > 0, "bound to the model's rotary base"
            got = model(ids).logits
    torch.testing.assert_close(got[:, :48], dense[:, :48], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got[:, 48:], dense[:, 48:], atol=1e-3)


def test_bad_configs_are_refused() -> None:
    with pytest.raises(TypeError, match="tail"):
        LongHeads(tail=64)  # no dense tail: it would read past the window
    with pytest.raises(SparseLLMError, match="3 blocks"):
        LongHeads(length=512, block=256)
    cfg = tiny_config("llama")
    cfg.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(SparseLLMError, match="plain RoPE"):
        LongHeads().bind(cfg)
    with pytest.raises(SparseLLMError, match="rotary base"):
        LongHeads().block_mask(torch.zeros(1, 1, 8, 4), torch.zeros(1, 1, 8, 4), 0)
