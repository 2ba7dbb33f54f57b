"""Speculative decoding returns the target's own tokens (greedy) or distribution (sampling)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import pytest
import torch

from sparsellm.errors import SparseLLMError
from sparsellm.methods.activation.apply import sparsify_activations
from sparsellm.methods.activation.teal import TEALConfig
from sparsellm.models.tiny import tiny_model
from sparsellm.runtime.decode import DecodeRuntime
from sparsellm.runtime.speculative import (
    RECYCLING_TREES,
    Lane,
    Lookup,
    ModelDraft,
    NGram,
    Pacer,
    Stats,
    TokenRecycling,
    Tree,
    accept_node,
    build_draft,
    chain,
    draft_together,
    plan_lanes,
    prepare_target,
)


def _prompt(seed: int = 7) -> torch.Tensor:
    # a repeated phrase, so retrieval drafts find matches and get tokens accepted
    phrase = torch.randint(0, 256, (6,), generator=torch.Generator().manual_seed(seed))
    return torch.cat([phrase, phrase, phrase[:3]]).view(1, -1)


def _plain(rt: DecodeRuntime, ids: torch.Tensor, n: int, sparse: bool = False) -> list[int]:
    return list(rt.stream(ids, n, sparse=sparse))


def _drafts(model: torch.nn.Module, rt: DecodeRuntime) -> dict[str, object]:
    other = DecodeRuntime(model, max_len=rt.max_len, fmt="int8")  # a lossy "draft model"
    return {
        "lookup": Lookup(),
        "ngram": NGram(width=2),
        "token-recycling": TokenRecycling(rt.lm_head.out_features),
        "model": ModelDraft(other, sparse=False, shares_cache=False),
    }


def _rows_per_step(rt: DecodeRuntime) -> list[int]:
    """Record the number of rows of each `rt.step` call from now on."""
    rows: list[int] = []
    step = rt.step

    def counted(tokens: torch.Tensor, *args: object, **kw: object) -> torch.Tensor:
        rows.append(len(tokens))
        return step(tokens, *args, **kw)

    rt.step = counted
    return rows


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])  # the runtime's families
def test_greedy_output_is_the_targets_token_for_token(family: str) -> None:
    model = tiny_model(family, layers=2)
    rt = DecodeRuntime(model, max_len=96)
    ids = _prompt()
    want = _plain(rt, ids, 40)
    for name, draft in _drafts(model, rt).items():
        stats = Stats()
        got = list(Lane(rt, draft, 40, stats=stats, switch=False).stream(ids))
        assert got == want, name
        assert stats.passes < 39 or name == "model", name  # some drafts were accepted


def test_self_sparse_draft_shares_the_cache_and_stays_exact(calib_ids: torch.Tensor) -> None:
    model = tiny_model("llama", layers=2)
    rt = DecodeRuntime(model, max_len=96)
    want = _plain(rt, _prompt(), 40)
    sparsify_activations(model, calib_ids, TEALConfig(sparsity=0.5, max_tokens=256))
    rt = DecodeRuntime(model, max_len=96)  # dense path = target, sparse path = draft
    stats = Stats()
    draft = ModelDraft(rt, sparse=True, shares_cache=True)
    assert list(Lane(rt, draft, 40, stats=stats, switch=False).stream(_prompt())) == want
    assert stats.accepted > 0


def test_packed_self_draft_is_the_targets_weights_in_another_format() -> None:
    model = tiny_model("qwen2", layers=2)
    rt = DecodeRuntime(model, max_len=96)
    loaded = SimpleNamespace(model=model)
    assert prepare_target("self:int8", loaded) is False  # nothing to calibrate, target as is
    draft = build_draft("self:int8", rt, loaded)
    assert isinstance(draft, ModelDraft) and draft.rt.fmt == "int8" and draft.target is rt
    stats = Stats()
    got = list(Lane(rt, draft, 40, stats=stats, switch=False).stream(_prompt()))
    assert got == _plain(rt, _prompt(), 40)
    assert stats.accepted > stats.drafted / 2  # an int8 copy mostly agrees with fp32


def test_shared_cache_draft_reads_the_targets_keys_and_feeds_one_token_per_pass() -> None:
    """`share_cache`: a runtime of the same blocks attends over the target's cache, so
    with the same weights its step is the target's step exactly; a block subset shares
    only its blocks. A packed self-draft on it feeds one row per pass (the pass's last
    token), not every accepted token, and the output stays the target's."""
    model = tiny_model("llama", layers=4)
    rt = DecodeRuntime(model, max_len=96)
    ids = _prompt()
    rt.reset(1)
    rt.forward(ids, 0, False)
    same = DecodeRuntime(model, max_len=96)
    same.share_cache(rt)
    at = torch.tensor([ids.shape[1]])
    zero = torch.zeros(1, dtype=torch.int64)
    mine = same.step(torch.tensor([3]), zero, at, at, False)
    assert torch.equal(mine, rt.step(torch.tensor([3]), zero, at, at, False))
    part = DecodeRuntime(model, max_len=96, layers=[0, 2, 3])
    part.share_cache(rt)
    assert part.layers[1].k_cache is rt.layers[2].k_cache
    with pytest.raises(SparseLLMError, match="lacks"):
        rt.share_cache(part)

    loaded = SimpleNamespace(model=model)
    draft = build_draft("self:int8", rt, loaded)
    rows = _rows_per_step(draft.rt)
    stats = Stats()
    got = list(Lane(rt, draft, 40, stats=stats, switch=False).stream(ids))
    assert got == _plain(rt, ids, 40)
    assert stats.accepted > stats.drafted / 2 and set(rows) == {1}


def test_model_drafts_of_several_lanes_step_together_and_draft_what_they_would_alone() -> None:
    """A batching server's lanes with copies of one model draft (`for_rows`) draft in
    steps of a row per lane, and each lane's chain is the one it drafts alone."""
    model = tiny_model("qwen2", layers=2)
    loaded = SimpleNamespace(model=model)
    prompts = [_prompt(seed) for seed in (1, 2, 3)]

    def lanes() -> list[Lane]:
        rt = DecodeRuntime(model, max_len=96)
        rt.reset(3)
        drafts = build_draft("self:int8", rt, loaded).for_rows(3)
        out = [Lane(rt, d, 20, seq=i, switch=False) for i, d in enumerate(drafts)]
        for lane, ids in zip(out, prompts, strict=True):
            lane.start(ids)
        return out

    together = lanes()
    rows = _rows_per_step(cast(ModelDraft, together[0].draft).rt)
    passes = plan_lanes(together, 4)
    alone = [plan_lanes([lane], 4)[0] for lane in lanes()]
    assert [p.tokens for p in passes] == [p.tokens for p in alone]
    assert all(len(p.tokens) == 4 for p in passes)  # the last token and 3 drafted
    assert rows == [3, 3, 3]  # the pass's last token, then two drafted ones, per lane

    # different lengths, and a lane whose context repeats itself (copied, no step)
    def together_or_alone(together: bool) -> tuple[list[Tree], list[int]]:
        rt = DecodeRuntime(model, max_len=96)
        rt.reset(3)
        drafts = build_draft("self:int8+lookup", rt, loaded).for_rows(3)
        made = _rows_per_step(cast(ModelDraft, drafts[0]).rt)
        contexts = []
        for r, (draft, ids) in enumerate(zip(drafts, prompts, strict=True)):
            rt.forward(ids, 0, False, seq=r)
            draft.prompt(ids)
            contexts.append([*ids[0].tolist(), 7] if r < 2 else ids[0].tolist())
        greedy = [lambda x: (int(x.argmax()), None)] * 3
        if together:
            return draft_together(drafts, contexts, [1, 3, 2], greedy), made
        pairs = zip(drafts, contexts, [1, 3, 2], strict=True)
        return [draft_together([d], [c], [k], greedy[:1])[0] for d, c, k in pairs], made

    (mixed, made), (alone_trees, _) = together_or_alone(True), together_or_alone(False)
    assert [t.tokens for t in mixed] == [t.tokens for t in alone_trees]
    assert [len(t.tokens) for t in mixed[:2]] == [1, 3] and mixed[2].copied
    assert made == [2, 1, 1]  # lanes 0 and 1 feed their last token, then lane 1 alone


def test_lookup_first_model_draft_copies_repeats_and_stays_exact() -> None:
    """`self:int8+lookup`: where the context's last trigram occurred before, the pass
    copies what followed it and the int8 model takes no step; elsewhere the model drafts.
    The output is the target's, token for token."""
    from sparsellm.errors import SparseLLMError

    model = tiny_model("qwen2", layers=2)
    rt = DecodeRuntime(model, max_len=96)
    loaded = SimpleNamespace(model=model)
    draft = build_draft("self:int8+lookup", rt, loaded)
    assert isinstance(draft, ModelDraft) and draft.copy_n == 3
    steps = _rows_per_step(draft.rt)
    context = [5, 6, 7, 8, 9, 5, 6, 7]
    rt.reset(1)  # the draft attends over the target's cache
    draft.prompt(torch.tensor([context]))
    assert draft.propose(context, 3, lambda x: (int(x.argmax()), None)).tokens == [8, 9, 5]
    assert not steps and draft.copied == 1
    assert draft.propose(context, 3, lambda x: (int(x.argmax()), None)).copied
    drafted = draft.propose([*context, 1], 2, lambda x: (int(x.argmax()), None))
    assert len(drafted.tokens) == 2 and not drafted.copied
    assert steps  # no earlier (7, 1): the model drafted
    stats = Stats()
    draft = build_draft("self:int8+lookup", rt, loaded)
    got = list(Lane(rt, draft, 40, stats=stats, switch=False).stream(_prompt()))
    assert got == _plain(rt, _prompt(), 40)
    assert draft.copied > 0 and stats.accepted > 0
    for bad in ("n=0", "n=x", "m=3"):
        with pytest.raises(SparseLLMError, match="n=N"):
            build_draft(f"self:int8+lookup:{bad}", rt, loaded)


def test_self_spec_parts() -> None:
    from sparsellm.errors import SparseLLMError
    from sparsellm.runtime.speculative import self_parts

    assert self_parts("int8") == ("int8", None, None, None, None)
    recipe = "teal:sparsity=0.4,nsamples=8"
    assert self_parts(recipe) == (None, None, recipe, None, None)
    assert self_parts("int8+skip:ratio=0.25,score=ppl+teal:sparsity=0.4+vocab:size=64") == (
        "int8",
        {"ratio": "0.25", "score": "ppl"},
        "teal:sparsity=0.4",
        {"size": "64"},
        None,
    )
    assert self_parts("int8+lookup:n=4").lookup == {"n": "4"}
    assert self_parts("teal:sparsity=0.4+lookup").lookup == {}
    for bad in ("", "int8+bf16", "skip:ratio=0.1+skip:ratio=0.2", "vocab:size=2+vocab:size=3",
                "lookup", "int8+lookup+lookup"):  # fmt: skip
        with pytest.raises(SparseLLMError):
            self_parts(bad)


def test_skip_draft_leaves_out_the_block_that_does_nothing() -> None:
    from sparsellm.models.tiny import byte_tokenizer
    from sparsellm.runtime.speculative import skipped_blocks

    model = tiny_model("llama", layers=4)
    with torch.no_grad():  # block 2 adds nothing to the residual stream: angle 0
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    rt = DecodeRuntime(model, max_len=96)
    loaded = SimpleNamespace(model=model, tokenizer=byte_tokenizer())
    spec = "self:skip:ratio=0.25,nsamples=2,seqlen=32"
    assert prepare_target(spec, loaded) is False
    draft = build_draft(spec, rt, loaded)
    assert isinstance(draft, ModelDraft) and len(draft.rt.layers) == 3
    assert skipped_blocks(loaded, {"ratio": "0.25", "nsamples": "2", "seqlen": "32"}) == [2]
    ids = _prompt()
    want = _plain(rt, ids, 30)
    assert _plain(draft.rt, ids, 30) == want  # the skipped block changed nothing
    stats = Stats()
    assert list(Lane(rt, draft, 30, stats=stats, switch=False).stream(ids)) == want
    assert stats.accepted == stats.drafted  # a draft equal to the target is always right


def test_int8_teal_self_draft_skips_channels_and_stays_exact() -> None:
    from sparsellm.models.tiny import byte_tokenizer

    model = tiny_model("qwen2", layers=2)
    want = _plain(DecodeRuntime(model, max_len=96), _prompt(), 40)
    loaded = SimpleNamespace(model=model, tokenizer=byte_tokenizer())
    spec = "self:int8+teal:sparsity=0.5,nsamples=2,seqlen=32"
    assert prepare_target(spec, loaded) is True  # the model now holds thresholds
    rt = DecodeRuntime(model, max_len=96)
    draft = build_draft(spec, rt, loaded)
    assert isinstance(draft, ModelDraft) and draft.rt.fmt == "int8" and draft.sparse
    stats = Stats()
    got = list(Lane(rt, draft, 40, stats=stats, switch=False).stream(_prompt()))
    assert got == want
    assert draft.rt.skipped_fraction() > 0.3  # its steps skipped channels
    assert stats.accepted > 0


def test_frequent_tokens_by_hand() -> None:
    from sparsellm.models.tiny import byte_tokenizer
    from sparsellm.runtime.speculative import frequent_tokens

    tok = byte_tokenizer()  # "a" "b" "c" are ids 64, 65, 66; end of sequence is 0
    assert tok("abbccc").input_ids == [64, 65, 65, 66, 66, 66] and tok.eos_token_id == 0
    assert frequent_tokens(tok, "abbccc", 2).tolist() == [0, 66]  # eos kept, then c (3)
    assert frequent_tokens(tok, "abbccc", 3).tolist() == [0, 65, 66]
    assert frequent_tokens(tok, "aabbc", 3).tolist() == [0, 64, 65]  # a = b: lower id first


def test_reduced_vocab_draft_stays_exact_and_maps_its_rows_back() -> None:
    """FR-Spec: the draft's head keeps some rows and its picks are mapped back to token
    ids. A head holding every token the target emits drafts exactly the target's tokens;
    one missing them still gives the target's output (the target verifies everything)."""
    from sparsellm.runtime.speculative import reduce_head

    model = tiny_model("qwen2", layers=2)
    rt = DecodeRuntime(model, max_len=96)
    want = _plain(rt, _prompt(), 40)
    head = model.get_output_embeddings()
    full = head.weight.shape[0]
    for ids, all_right in [
        (torch.tensor(sorted(set(want) | {1, 2, 3})), True),
        (torch.tensor([t for t in range(full) if t not in set(want[5:])]), False),
    ]:
        draft = ModelDraft(DecodeRuntime(model, max_len=96), sparse=False, shares_cache=False,
                           vocab=ids, full_vocab=full)  # fmt: skip
        reduce_head(draft.rt, head, ids)
        assert draft.rt.lm_head.out_features == len(ids)
        stats = Stats()
        got = list(Lane(rt, draft, 40, stats=stats, switch=False).stream(_prompt()))
        assert got == want
        assert (stats.accepted == stats.drafted) == all_right
    # sampling: the draft distribution is spread back over the whole vocabulary
    ids = torch.tensor([5, 7, 9])
    draft = ModelDraft(rt, sparse=False, shares_cache=False, vocab=ids, full_vocab=full)
    logits = torch.tensor([0.0, 2.0, 1.0])
    token, q = draft._pick(logits, lambda x: (int(x.argmax()), torch.softmax(x, -1)))
    assert token == 7 and q is not None and q.shape == (full,)
    assert torch.equal(q[ids], torch.softmax(logits, -1)) and float(q.sum()) == pytest.approx(1)


def test_vocab_self_draft_spec_builds_a_reduced_head() -> None:
    from sparsellm.models.tiny import byte_tokenizer

    model = tiny_model("llama", layers=2)
    rt = DecodeRuntime(model, max_len=96)
    loaded = SimpleNamespace(model=model, tokenizer=byte_tokenizer())
    draft = build_draft("self:int8+vocab:size=40,chars=4000", rt, loaded)
    assert isinstance(draft, ModelDraft) and draft.rt.fmt == "int8" and draft.vocab is not None
    assert draft.rt.lm_head.out_features == 40 and 0 in draft.vocab.tolist()
    got = list(Lane(rt, draft, 30, switch=False).stream(_prompt()))
    assert got == _plain(rt, _prompt(), 30)
    # the prompt's tokens joined the head's rows for that generation
    want = torch.unique(torch.cat([draft.static, _prompt()[0]]))
    assert torch.equal(draft.vocab, want) and draft.rt.lm_head.out_features == len(want) > 40
    # rows of a batching server share the runtime: its head goes back to the corpus's rows
    rows = draft.for_rows(2)
    assert draft.rt.lm_head.out_features == 40
    assert all(isinstance(d, ModelDraft) and d.vocab is draft.static for d in rows)
    assert [d.seq for d in rows] == [0, 1] and all(d.head is None for d in rows)


def test_packed_self_draft_needs_the_weights_in_memory() -> None:
    from sparsellm.errors import SparseLLMError

    model = tiny_model("llama", layers=2)
    rt = DecodeRuntime(model, max_len=96, fmt="int8")
    rt.release_model_weights()
    with pytest.raises(SparseLLMError, match="stored packed"):
        build_draft("self:int8", rt, SimpleNamespace(model=model))


def test_stop_token_and_length_are_respected() -> None:
    model = tiny_model("llama")
    rt = DecodeRuntime(model, max_len=96)
    ids = _prompt()
    want = _plain(rt, ids, 30)
    stop = want[12]
    got = list(Lane(rt, Lookup(), 30, stop=frozenset({stop})).stream(ids))
    assert got == want[: want.index(stop) + 1]
    assert len(list(Lane(rt, Lookup(), 5).stream(ids))) == 5
    with pytest.raises(SparseLLMError, match="row 0"):
        next(Lane(rt, Lookup(), 5, seq=1).stream(ids))


def test_lookup_copies_what_followed_the_last_match() -> None:
    tree = Lookup().propose([1, 2, 3, 4, 5, 9, 2, 3], 3, None)
    assert tree.tokens == [4, 5, 9] and tree.is_chain()
    assert Lookup().propose([1, 2, 3], 3, None).tokens == []


def test_ngram_tree_branches_on_the_most_frequent_continuations() -> None:
    # after (7,): 8 twice, 9 once; after (7, 8): 1 twice
    ctx = [7, 8, 1, 7, 8, 1, 7, 9, 7]
    tree = NGram(n=3, width=2).propose(ctx, 3, None)
    assert tree.tokens[0] == 8 and tree.parents[0] == -1
    assert 9 in [t for t, p in zip(tree.tokens, tree.parents, strict=True) if p == -1]
    assert tree.tokens[1] == 1 and tree.parents[1] == 0  # (7, 8) -> 1


def test_token_recycling_reads_its_static_tree_out_of_the_matrix() -> None:
    draft = TokenRecycling(vocab=10, top_k=3, tree="wide")
    logits = torch.zeros(2, 10)
    logits[0, [4, 5, 6]] = torch.tensor([3.0, 2.0, 1.0])  # after token 1: 4, 5, 6
    logits[1, [7, 8, 9]] = torch.tensor([3.0, 2.0, 1.0])  # after token 4: 7, 8, 9
    draft.update([], [1, 4], logits)
    tree = draft.propose([0, 1], 4, None)
    roots = [t for t, p in zip(tree.tokens, tree.parents, strict=True) if p == -1]
    assert roots == [4, 5, 6]
    kids_of_4 = [t for t, p in zip(tree.tokens, tree.parents, strict=True) if p == 0]
    assert kids_of_4 == [7, 8]  # ranks 0 and 1 of the template under the first root
    assert len(tree.tokens) <= len(RECYCLING_TREES["wide"])
    small = TokenRecycling(vocab=10, top_k=3)
    small.update([], [1, 4], logits)
    assert small.propose([0, 1], 4, None).tokens == [4, 5, 7]  # top-1 path, root's second


def test_token_recycling_takes_a_tree_as_pairs_and_names_each_node_s_position() -> None:
    # positions: 0 = rank 0 at the root, 1 = rank 2 at the root, 2 = rank 0 under 1,
    # 3 = rank 1 under 0
    draft = TokenRecycling(vocab=10, top_k=3, tree=[(-1, 0), (-1, 2), (1, 0), (0, 1)])
    logits = torch.zeros(3, 10)
    logits[0, [4, 5, 6]] = torch.tensor([3.0, 2.0, 1.0])  # after token 1: 4, 5, 6
    logits[1, [7, 8, 9]] = torch.tensor([3.0, 2.0, 1.0])  # after token 4: 7, 8, 9
    logits[2, [2, 3, 0]] = torch.tensor([3.0, 2.0, 1.0])  # after token 6: 2, 3, 0
    draft.update([], [1, 4, 6], logits)
    tree = draft.propose([0, 1], 4, None)
    assert tree.tokens == [4, 6, 2, 8]
    assert tree.parents == [-1, -1, 1, 0]
    assert draft.nodes == [0, 1, 2, 3]
    # a token without a row yet places nothing under it; `nodes` skips those positions
    draft.adj[6] = -1
    tree = draft.propose([0, 1], 4, None)
    assert tree.tokens == [4, 6, 8] and draft.nodes == [0, 1, 3]
    for bad in ([(0, 0)], [(-1, 3)], [(-1, 0), (2, 0), (-1, 1)]):
        with pytest.raises(SparseLLMError, match="parents first"):
            TokenRecycling(vocab=10, top_k=3, tree=bad)
    with pytest.raises(SparseLLMError, match="must be one of"):
        TokenRecycling(vocab=10, tree="huge")


def _empirical(sample, n: int, vocab: int) -> torch.Tensor:
    counts = torch.zeros(vocab)
    for _ in range(n):
        counts[sample()] += 1
    return counts / n


def test_multi_candidate_rejection_keeps_the_target_distribution() -> None:
    p = torch.tensor([0.05, 0.4, 0.3, 0.2, 0.05], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    cands = [(0, 2), (1, 4), (2, 1)]  # point-mass offers
    freq = _empirical(lambda: accept_node(p, cands, None, gen)[1], 20000, 5)
    assert torch.allclose(freq, p.float(), atol=0.015)


def test_model_draft_rejection_keeps_the_target_distribution() -> None:
    p = torch.tensor([0.1, 0.6, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.4, 0.1, 0.1, 0.4], dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)

    def one() -> int:
        x = int(torch.multinomial(q, 1, generator=gen))
        return accept_node(p, [(0, x)], [q], gen)[1]

    freq = _empirical(one, 20000, 4)
    assert torch.allclose(freq, p.float(), atol=0.015)


def test_sampled_speculative_tokens_follow_the_target_distribution() -> None:
    """First two sampled tokens after a prompt, plain vs speculative, over many seeds:
    the same joint distribution (a seeded statistical test on a tiny model)."""
    model = tiny_model("llama")
    rt = DecodeRuntime(model, max_len=64)
    ids = _prompt()
    rt.reset(1)
    logits = rt.forward(ids, 0, False, last_only=True)[0, -1]
    first = torch.softmax(logits.double() / 1.5, -1)
    top = int(first.argmax())
    hits = 0
    n = 600
    for seed in range(n):
        out = list(Lane(rt, Lookup(), 2, temperature=1.5, seed=seed).stream(ids))
        hits += out[0] == top
    # binomial check of the first token's most likely value: within 4 sigma
    mean, sd = n * float(first[top]), (n * float(first[top]) * (1 - float(first[top]))) ** 0.5
    assert abs(hits - mean) < 4 * sd + 1


def test_tree_helpers() -> None:
    t = Tree()
    a = t.add(5, -1)
    t.add(6, a)
    t.add(7, -1)
    assert t.depth() == [0, 1, 0] and not t.is_chain()
    assert chain([1, 2, 3]).is_chain()


def test_pacer_stops_drafting_when_plain_passes_are_faster() -> None:
    pace = Pacer(max_draft=8, probe=16)
    ks = []
    for _ in range(48):
        k = pace.next_k()
        ks.append(k)
        # a draft never accepted: its passes give 1 token in 1.6 time units, plain ones in 1
        pace.record(k, 0, 1, 1.6 if k else 1.0)
    assert ks[0] > 0 and ks[1] == 0  # starts drafting, probes plain on the 2nd pass
    assert sum(k == 0 for k in ks[8:]) >= 36  # then mostly plain, probing now and then
    assert any(k > 0 for k in ks[8:])
    pace = Pacer(max_draft=8)
    for _ in range(10):
        k = pace.next_k()
        pace.record(k, 3 if k else 0, 4 if k else 1, 1.5 if k else 1.0)
    assert pace.next_k() == 4  # accepting ~3 a pass: draft 4
    pace.record(4, 0, 1, 1.0, learn=False)  # a copied pass that failed
    assert pace.next_k() == 4  # the model's draft length is unchanged
