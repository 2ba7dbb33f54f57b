import gzip
import json
import math

import pytest
import torch
import torch.nn.functional as F

from sparsellm.errors import SparseLLMError
from sparsellm.eval import zeroshot
from sparsellm.eval.zeroshot import encode_pair, load_docs, score_pairs, task_path
from sparsellm.models.tiny import byte_tokenizer, tiny_model


def _write_requests(path, docs):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for doc_id, gold, pairs in docs:
            for ctx, cont in pairs:
                f.write(
                    json.dumps(
                        {
                            "doc_id": doc_id,
                            "label": gold,
                            "request": {"context": ctx, "continuation": cont},
                        }
                    )
                    + "\n"
                )


def test_encode_pair_moves_trailing_space_like_lm_eval():
    tok = byte_tokenizer()
    ctx, cont = encode_pair(tok, "Answer: ", "yes")
    assert tok.decode(ctx) == "Answer:" and tok.decode(cont) == " yes"


def test_scores_match_a_hand_computed_log_likelihood():
    model, tok = tiny_model("llama"), byte_tokenizer()
    pairs = [("The cat", " sat"), ("A much longer context here", " ok"), ("x", " yz")]
    batched = score_pairs(model, tok, pairs, batch_size=8)
    for (ctx, cont), (ll, greedy) in zip(pairs, batched, strict=True):
        c, x = encode_pair(tok, ctx, cont)
        ids = torch.tensor([c + x])
        with torch.no_grad():
            lp = F.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        expected = sum(lp[len(c) - 1 + j, t].item() for j, t in enumerate(x))
        assert ll == pytest.approx(expected, abs=1e-4)
        assert greedy == all(lp[len(c) - 1 + j].argmax().item() == t for j, t in enumerate(x))


def test_task_metrics_from_a_request_file(tmp_path, monkeypatch):
    model, tok = tiny_model("llama"), byte_tokenizer()
    pairs_a = [("Q1:", " aa"), ("Q1:", " bbbbbb")]
    pairs_b = [("Q2:", " c"), ("Q2:", " dd")]
    path = tmp_path / "requests.jsonl.gz"
    _write_requests(path, [(0, 1, pairs_a), (1, 0, pairs_b), (1_000_000, 0, pairs_b)])
    monkeypatch.setattr(zeroshot, "task_path", lambda task: path)
    monkeypatch.setitem(zeroshot.TASKS, "toy", ("toy", "rc_0shot", "mc"))
    out = zeroshot.evaluate_task(model, tok, "toy", limit=None)
    assert out["docs"] == 2  # the unconditional doc (id >= 1e6) is dropped
    lls = [ll for ll, _ in score_pairs(model, tok, pairs_a + pairs_b)]
    acc = [float(lls[1] > lls[0]), float(lls[2] > lls[3])]
    norm = [float(lls[1] / 7 > lls[0] / 3), float(lls[2] / 2 > lls[3] / 3)]
    assert out["acc"] == pytest.approx(sum(acc) / 2)
    assert out["acc_norm"] == pytest.approx(sum(norm) / 2)


def test_bad_inputs(tmp_path):
    with pytest.raises(SparseLLMError, match="unknown task 'nope'; valid: arc_easy"):
        task_path("nope")
    bad = tmp_path / "r.jsonl.gz"
    with gzip.open(bad, "wt") as f:
        f.write('{"doc_id": 0, "request": {"context": "a"}}\n')
    with pytest.raises(SparseLLMError, match="corrupt request"):
        load_docs(bad)
    bad.write_bytes(b"not gzip")
    with pytest.raises(SparseLLMError, match="cannot read request file"):
        load_docs(bad)
    model, tok = tiny_model("llama"), byte_tokenizer()
    with pytest.raises(SparseLLMError, match="refusing to truncate"):
        score_pairs(model, tok, [("x" * 600, " y")])


def test_greedy_task_with_answer_list_labels(tmp_path, monkeypatch):
    """lambada-style files carry a list of answer strings as label; acc = greedy match."""
    model, tok = tiny_model("llama"), byte_tokenizer()
    path = tmp_path / "requests.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, (ctx, cont) in enumerate([("abc", " d"), ("xyz", " w")]):
            f.write(
                json.dumps(
                    {
                        "doc_id": i,
                        "label": [cont.strip()],
                        "request": {"context": ctx, "continuation": cont},
                    }
                )
                + "\n"
            )
    monkeypatch.setattr(zeroshot, "task_path", lambda task: path)
    monkeypatch.setitem(zeroshot.TASKS, "toy_greedy", ("toy", "bpb_0shot", "greedy"))
    out = zeroshot.evaluate_task(model, tok, "toy_greedy", limit=None)
    greedy = [g for _, g in score_pairs(model, tok, [("abc", " d"), ("xyz", " w")])]
    assert out["docs"] == 2 and out["acc"] == sum(greedy) / 2
    assert "acc_norm" not in out


def test_qa_task_reports_bits_per_byte_and_exact_match(tmp_path, monkeypatch):
    """Knowledge/reading QA: bpb = -log2 p(answer) / UTF-8 bytes; em = greedy match."""
    model, tok = tiny_model("llama"), byte_tokenizer()
    path = tmp_path / "requests.jsonl.gz"
    pairs = [("Question: capital?\nAnswer:", " Paris"), ("Category: X\nAnswer:", " née")]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, (ctx, cont) in enumerate(pairs):
            req = {"doc_id": i, "label": "str label", "request": {"context": ctx}}
            req["request"]["continuation"] = cont
            f.write(json.dumps(req) + "\n")
    monkeypatch.setattr(zeroshot, "task_path", lambda task: path)
    monkeypatch.setitem(zeroshot.TASKS, "toy_qa", ("toy", "bpb_5shot", "qa"))
    out = zeroshot.evaluate_task(model, tok, "toy_qa", limit=None)
    scores = score_pairs(model, tok, pairs)
    nbytes = [6, 5]  # " Paris", " née" (é is two bytes)
    bpb = [-ll / (math.log(2) * n) for (ll, _), n in zip(scores, nbytes, strict=True)]
    assert out["bpb"] == pytest.approx(sum(bpb) / 2)
    assert out["em"] == out["acc"] == sum(g for _, g in scores) / 2
