import torch

import sparsellm as sl
from sparsellm.eval.speed import alternate_medians, compare_speed, parameter_bytes
from sparsellm.models.tiny import tiny_model


def test_parameter_bytes_counts_zeros_and_tied_weights_once():
    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    params = {id(p): p for p in model.parameters()}
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:2] = 0.0  # 2 rows × 64 inputs
    info = parameter_bytes(model)
    assert info["numel"] == sum(p.numel() for p in params.values())
    assert info["bytes"] == 4 * info["numel"]
    assert info["zeros"] == 128


def test_compare_speed_reports_both_models_and_ratios():
    dense = tiny_model("llama")
    sparse = tiny_model("llama")
    sl.sparsify(sparse, [{"method": "magnitude", "sparsity": 0.5}])
    out = compare_speed(dense, sparse, lengths=(16, 32), new_tokens=4, repeats=1)
    assert set(out["prefill"]) == {"16", "32"}
    for entry in [*out["prefill"].values(), out["decode"]]:
        assert entry["dense_tok_s"] > 0 and entry["sparse_tok_s"] > 0
        ratio = entry["sparse_tok_s"] / entry["dense_tok_s"]
        assert abs(entry["speedup"] - ratio) < 1e-9
    assert out["decode"]["tokens"] == 4
    assert out["sparse_params"]["zeros"] > out["dense_params"]["zeros"]


def test_alternate_medians_interleaves_and_takes_medians() -> None:
    calls: list[str] = []
    values = {"a": iter([9.0, 1.0, 3.0, 2.0]), "b": iter([9.0, 5.0, 4.0, 6.0])}

    def job(k: str) -> float:
        calls.append(k)
        return next(values[k])

    med = alternate_medians({"a": lambda: job("a"), "b": lambda: job("b")}, repeats=3)
    assert calls == ["a", "b"] * 4  # one untimed warm-up round, then a, b in turn
    assert med == {"a": 2.0, "b": 5.0}
