"""The lm-eval adapter: runs on an in-memory model and agrees with our scorer per document.

Hand-written request files (multiple choice with a shared context, Winogrande-style
shared continuation, LAMBADA-style greedy) are converted with `write_olmo_tasks` and
run through lm-eval once per module on a seeded tiny model (~3 s, mostly lm-eval's import).
"""

import gzip
import json
import math
import sys

import pytest
import torch

from sparsellm.errors import SparseLLMError
from sparsellm.eval import harness, zeroshot
from sparsellm.eval.zeroshot import load_docs, score_pairs
from sparsellm.models.tiny import byte_tokenizer, tiny_model

pytest.importorskip("lm_eval")

MC = [  # shared context; continuations of different lengths so acc_norm can differ from acc
    (0, 1, [("Q: Is the sky blue?\nA:", " yes"), ("Q: Is the sky blue?\nA:", " no, never")]),
    (1, 0, [("Colour of grass: ", "green"), ("Colour of grass: ", "a red one")]),  # trailing space
    (2, 2, [("2+2=", " 3"), ("2+2=", " 5"), ("2+2=", " 4"), ("2+2=", " 22")]),
    (5, 0, [("Pick one.", " a"), ("Pick one.", " bb"), ("Pick one.", " ccc")]),
]
WINO = [  # shared continuation, per-choice contexts
    (0, 1, [("Sarah beat Maria so Sarah", " won."), ("Sarah beat Maria so Maria", " won.")]),
    (1, 0, [("The cup fell off the table", " broke."), ("The table fell off the cup", " broke.")]),
    (2, 1, [("x y", " z"), ("x y z", " z")]),
]
GREEDY_CONTEXTS = ["The cat", "Once upon a time", "hello", "A B C", "sparse model", "It was"]


def _write_requests(path, docs):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for doc_id, gold, pairs in docs:
            for ctx, cont in pairs:
                req = {
                    "doc_id": doc_id,
                    "label": gold,
                    "request": {"context": ctx, "continuation": cont},
                }
                f.write(json.dumps(req) + "\n")


def _greedy_docs(model, tok):
    """LAMBADA-style docs: the tiny model's own argmax next character (acc 1) and a miss."""
    docs = []
    for i, ctx in enumerate(GREEDY_CONTEXTS):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tok.encode(ctx)])).logits[0, -1]
        char = tok.decode([int(logits.argmax())])
        if char.isascii() and char.isprintable():  # round-trips through the byte tokenizer
            docs.append((i, ["x"], [(ctx, char)]))
        else:
            docs.append((i, ["x"], [(ctx, " nope")]))
    assert any(len(pairs[0][1]) == 1 for _, _, pairs in docs), "no greedy hit: pick other contexts"
    return docs


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", seed=0), byte_tokenizer()


@pytest.fixture(scope="module")
def toy_tasks(tmp_path_factory, tiny):
    """Our request files for 3 toy tasks, the lm-eval tasks written from them, and the patch."""
    root = tmp_path_factory.mktemp("harness")
    paths = {"toy_mc": root / "mc.jsonl.gz", "toy_wino": root / "wino.jsonl.gz"}
    paths["toy_greedy"] = root / "greedy.jsonl.gz"
    _write_requests(paths["toy_mc"], MC)
    _write_requests(paths["toy_wino"], WINO)
    _write_requests(paths["toy_greedy"], _greedy_docs(*tiny))
    kinds = {"toy_mc": "mc", "toy_wino": "mc", "toy_greedy": "greedy"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(zeroshot, "task_path", lambda task: paths[task])
        for task, kind in kinds.items():
            mp.setitem(zeroshot.TASKS, task, (task, "toy", kind))
        include = harness.write_olmo_tasks(list(kinds), root / "lm_eval_tasks", limit=None)
    return paths, include  # unpatched again: later tests (and the real one) see the real tasks


@pytest.fixture(scope="module")
def lm_eval_run(toy_tasks, tiny):
    paths, include = toy_tasks
    model, tok = tiny
    names = [harness.TASK_PREFIX + t for t in paths]
    rng = torch.get_rng_state()
    metrics, samples = harness.run_harness_samples(
        model, tok, names, include_path=include, batch_size=4
    )
    assert torch.equal(torch.get_rng_state(), rng)  # lm-eval's reseeding does not leak out
    assert tok.pad_token is None  # HFLM set a pad token on a copy, not on ours
    return metrics, samples


def test_run_harness_returns_plain_metrics(lm_eval_run):
    metrics, samples = lm_eval_run
    mc, wino, greedy = (
        metrics[harness.TASK_PREFIX + t] for t in ("toy_mc", "toy_wino", "toy_greedy")
    )
    assert set(mc) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "docs"}
    assert set(wino) == {"acc", "acc_stderr", "docs"}  # acc_norm means another thing there
    assert set(greedy) == {"acc", "acc_stderr", "docs"}
    assert (mc["docs"], wino["docs"], greedy["docs"]) == (len(MC), len(WINO), len(GREEDY_CONTEXTS))
    assert all(isinstance(v, float | int) for m in metrics.values() for v in m.values())
    assert [s["doc_id"] for s in samples[harness.TASK_PREFIX + "toy_mc"]] == [0, 1, 2, 5]


@pytest.mark.parametrize("task", ["toy_mc", "toy_wino", "toy_greedy"])
def test_lm_eval_agrees_with_our_scorer_per_document(toy_tasks, lm_eval_run, tiny, task):
    paths, _ = toy_tasks
    model, tok = tiny
    samples = lm_eval_run[1][harness.TASK_PREFIX + task]
    docs = load_docs(paths[task])
    assert [s["doc_id"] for s in samples] == [d.doc_id for d in docs]
    for doc, sample in zip(docs, samples, strict=True):
        scores = score_pairs(model, tok, doc.pairs)
        lls = [ll for ll, _ in scores]
        # same requests, same tokens: log-likelihoods agree to float32 noise
        assert sample["loglikelihoods"] == pytest.approx(lls, abs=1e-4)
        assert sample["greedy"] == [g for _, g in scores]
        if task == "toy_greedy":
            assert sample["acc"] == float(all(g for _, g in scores))
            continue
        norm = [ll / len(cont) for ll, (_, cont) in zip(lls, doc.pairs, strict=True)]
        assert sample["acc"] == float(max(range(len(lls)), key=lls.__getitem__) == doc.gold)
        if task == "toy_mc":
            assert sample["acc_norm"] == float(
                max(range(len(norm)), key=norm.__getitem__) == doc.gold
            )
    if task == "toy_greedy":  # the test exercises both outcomes
        assert {s["acc"] for s in samples} == {0.0, 1.0}


def test_lm_eval_agrees_with_evaluate_task(toy_tasks, lm_eval_run, tiny, monkeypatch):
    paths, _ = toy_tasks
    monkeypatch.setattr(zeroshot, "task_path", lambda task: paths[task])
    monkeypatch.setitem(zeroshot.TASKS, "toy_mc", ("toy_mc", "toy", "mc"))
    ours = zeroshot.evaluate_task(*tiny, "toy_mc", limit=None)
    theirs = lm_eval_run[0][harness.TASK_PREFIX + "toy_mc"]
    for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
        assert theirs[key] == pytest.approx(ours[key]), key


def test_written_task_definitions(toy_tasks):
    _, include = toy_tasks
    import yaml

    mc = yaml.safe_load((include / "sparsellm_toy_mc.yaml").read_text())
    assert mc["target_delimiter"] == "" and mc["dataset_path"] == "json"
    wino = yaml.safe_load((include / "sparsellm_toy_wino.yaml").read_text())
    assert wino["doc_to_text"] == "gold" and wino["doc_to_choice"] == "contexts"
    rows = [json.loads(line) for line in (include / "sparsellm_toy_mc.jsonl").open()]
    assert rows[1] == {
        "doc_id": 1,
        "gold": 0,
        "context": "Colour of grass: ",
        "choices": ["green", "a red one"],
    }


def test_unknown_task_is_a_clear_error(toy_tasks, tiny):
    _, include = toy_tasks
    with pytest.raises(SparseLLMError, match=r"unknown lm-eval task\(s\) 'sparsellm_nope'.*holds"):
        harness.run_harness(*tiny, ["sparsellm_nope"], include_path=include, include_defaults=False)
    with pytest.raises(SparseLLMError, match="not a directory"):
        harness.run_harness(*tiny, ["x"], include_path=include / "missing")


def test_missing_lm_eval_names_the_pin(monkeypatch, tiny):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(SparseLLMError, match=r"pip install lm-eval==0\.4\.13"):
        harness.run_harness(*tiny, ["arc_easy"])


def test_documents_lm_eval_cannot_express(tmp_path, monkeypatch):
    path = tmp_path / "bad.jsonl.gz"
    _write_requests(path, [(0, 0, [("a", " b"), ("c", " d")])])  # neither side shared
    monkeypatch.setattr(zeroshot, "task_path", lambda task: path)
    monkeypatch.setitem(zeroshot.TASKS, "bad", ("bad", "toy", "mc"))
    with pytest.raises(SparseLLMError, match="share neither"):
        harness.write_olmo_tasks(["bad"], tmp_path / "out", None)


@pytest.mark.real
def test_converted_olmo_tasks_match_evaluate_task_on_the_default_model(tmp_path):
    from sparsellm.models.load import load_model

    model, tok = load_model("default")
    tasks = ["arc_easy", "winogrande", "lambada"]  # both multiple-choice modes and greedy
    include = harness.write_olmo_tasks(tasks, tmp_path, limit=10)
    theirs = harness.run_harness(
        model, tok, [harness.TASK_PREFIX + t for t in tasks], include_path=include
    )
    for task in tasks:
        ours = zeroshot.evaluate_task(model, tok, task, limit=10)
        got = theirs[harness.TASK_PREFIX + task]
        assert got["docs"] == ours["docs"] == 10
        assert got["acc"] == pytest.approx(ours["acc"]), task
        if "acc_norm" in got:
            assert got["acc_norm"] == pytest.approx(ours["acc_norm"]), task
        assert not math.isnan(got["acc_stderr"])
