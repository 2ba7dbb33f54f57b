"""End-to-end behaviour of `sparsify` on tiny models of every supported family."""

import pytest
import torch

import sparsellm as sl
from sparsellm.errors import SparseLLMError
from sparsellm.models.adapters import block_linears, get_blocks, weight_matrix
from sparsellm.models.tiny import FAMILIES, tiny_model

METHODS = ["magnitude", "wanda", "sparsegpt"]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_sparsity_zero_keeps_logits(family, method, calib_ids):
    model = tiny_model(family)
    before = _logits(model, calib_ids)
    sl.sparsify(model, [{"method": method, "sparsity": 0.0}], calib_ids)
    assert torch.equal(_logits(model, calib_ids), before)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("pattern", "sparsity"), [("unstructured", 0.6), ("2:4", None)])
def test_measured_sparsity_matches_target_per_layer(family, method, pattern, sparsity, calib_ids):
    model = tiny_model(family)
    report = sl.sparsify(
        model, [{"method": method, "sparsity": sparsity, "pattern": pattern}], calib_ids
    )
    target = 0.5 if pattern == "2:4" else 0.6
    n_linears = sum(len(block_linears(b)) for b in get_blocks(model))
    assert len(report.layers) == n_linears
    for fqn, entry in report.layers.items():
        w = weight_matrix(model.get_submodule(fqn))
        measured = (w == 0).float().mean().item()
        assert entry["sparsity"] == pytest.approx(measured)
        # SparseGPT selects per 128-column block: at most one weight per row-block off
        assert measured == pytest.approx(target, abs=0.01), fqn
        if pattern == "2:4":
            assert ((w == 0).view(w.shape[0], -1, 4).sum(-1) == 2).all()
    # embeddings and lm_head untouched
    assert (model.get_output_embeddings().weight != 0).all()
    assert torch.isfinite(_logits(model, calib_ids)).all()


def test_targets_and_ignore(calib_ids):
    model = tiny_model("llama")
    report = sl.sparsify(
        model, [{"method": "wanda", "targets": ["re:.*mlp"], "ignore": ["down_proj"]}], calib_ids
    )
    assert sorted({k.rsplit(".", 1)[1] for k in report.layers}) == ["gate_proj", "up_proj"]
    assert (weight_matrix(model.model.layers[0].self_attn.q_proj) != 0).all()


def test_recipe_errors():
    model = tiny_model("llama")
    with pytest.raises(
        SparseLLMError, match=r"unknown method 'nope'.*valid: .*magnitude.*sparsegpt.*wanda"
    ):
        sl.sparsify(model, [{"method": "nope"}])
    with pytest.raises(SparseLLMError, match=r"unknown key.*sparsty.*valid: sparsity, pattern"):
        sl.sparsify(model, [{"method": "wanda", "sparsty": 0.5}])
    with pytest.raises(SparseLLMError, match=r"implies sparsity 0\.5"):
        sl.sparsify(model, [{"method": "wanda", "pattern": "2:4", "sparsity": 0.7}])
    with pytest.raises(SparseLLMError, match="match no linear"):
        sl.sparsify(model, [{"method": "magnitude", "targets": ["lm_head"]}])
    with pytest.raises(SparseLLMError, match="needs calibration"):
        sl.sparsify(model, [{"method": "wanda"}])
    with pytest.raises(SparseLLMError, match="divide"):
        sl.sparsify(model, [{"method": "magnitude", "pattern": "3:7"}])


def test_nan_weights_refused(calib_ids):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(SparseLLMError, match=r"NaN/Inf in model\.layers\.1\.mlp\.up_proj"):
        sl.sparsify(model, [{"method": "magnitude"}], calib_ids)


def test_bf16_calibration_close_to_fp32(calib_ids):
    a, b = tiny_model("llama"), tiny_model("llama")
    sl.sparsify(a, [{"method": "wanda"}], calib_ids)
    sl.sparsify(b, [{"method": "wanda"}], calib_ids, calib_dtype=torch.bfloat16)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert pa.dtype == torch.float32 and pb.dtype == torch.float32
        # bf16 statistics can flip near-ties, never the bulk of the mask
        agree = ((pa == 0) == (pb == 0)).float().mean().item()
        assert agree > 0.95, name


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
def test_wanda_matches_a_naive_full_model_reference(family, calib_ids):
    """Our machinery (capture, block-wise propagation, shared stats, early block stop)
    gives the same masks as the obvious slow method: for each block in turn, run the
    whole (partly pruned) model with plain hooks and prune that block's layers."""
    from sparsellm.methods.weights.masks import unstructured_mask

    ours, ref = tiny_model(family), tiny_model(family)
    sl.sparsify(ours, [{"method": "wanda", "sparsity": 0.5}], calib_ids)
    for block in get_blocks(ref):
        linears = block_linears(block)
        sq: dict[str, torch.Tensor] = {}

        def record(name: str, x: torch.Tensor, sq: dict = sq) -> None:
            sq[name] = sq.get(name, 0.0) + x.reshape(-1, x.shape[-1]).square().sum(0)

        handles = [
            m.register_forward_hook(lambda _m, a, _o, n=n: record(n, a[0]))
            for n, m in linears.items()
        ]
        with torch.no_grad():
            ref(input_ids=calib_ids, use_cache=False)
        for h in handles:
            h.remove()
        with torch.no_grad():
            for n, m in linears.items():
                w = weight_matrix(m)
                w.masked_fill_(unstructured_mask(w.abs() * sq[n].sqrt(), 0.5, per="row"), 0.0)
    for (name, a), b in zip(ours.named_parameters(), ref.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_saved_recipe_reproduces_weights_bit_for_bit(calib_ids, tmp_path):
    """The recipe a report stores, written as JSON and parsed back, gives the same weights."""
    import json

    from sparsellm.recipe import parse_recipe

    recipe = [
        {"method": "wanda", "sparsity": 0.5, "targets": ["re:.*mlp"]},
        "sparsegpt:sparsity=0.6,targets=[re:.*self_attn]",
    ]
    first = tiny_model("llama")
    report = sl.sparsify(first, recipe, calib_ids)
    stored = json.loads(json.dumps(report.recipe.to_dict()))
    assert parse_recipe(stored) == report.recipe
    second = tiny_model("llama")
    sl.sparsify(second, stored, calib_ids)
    for (name, a), (_, b) in zip(
        first.state_dict().items(), second.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_one_step_three_spellings_are_one_config():
    from sparsellm.config import from_dict, from_spec
    from sparsellm.methods.weights.wanda import WandaConfig
    from sparsellm.recipe import parse_recipe

    python = WandaConfig(sparsity=0.5, targets=("re:.*mlp",), ignore=("down_proj",))
    spec = from_spec("wanda:sparsity=0.5,targets=[re:.*mlp],ignore=[down_proj]")
    yaml_like = from_dict(
        {"method": "wanda", "sparsity": 0.5, "targets": ["re:.*mlp"], "ignore": ["down_proj"]}
    )
    assert python == spec == yaml_like
    assert from_spec(python.to_spec()) == python
    assert parse_recipe([python]) == parse_recipe(
        ["wanda:sparsity=0.5,targets=[re:.*mlp],ignore=[down_proj]"]
    )


COMPOSED_YAML = """
steps:
  - {method: wanda, sparsity: 0.5, targets: ["re:.*mlp"]}
  - {method: teal, sparsity: 0.4, max_tokens: 64}
attention: {prefill: "sink_window:sink=16,window=16,block=16,min_length=32"}
"""


def test_composed_recipe_same_from_yaml_and_python(calib_ids):
    """Wanda 50% on the MLPs + TEAL 40% + sink_window prefill: YAML and Python give one
    Recipe, and applying it gives identical logits (inside `sl.attention`)."""
    import yaml

    from sparsellm.recipe import AttentionSpec, Recipe, parse_recipe

    python = Recipe(
        steps=(
            sl.WandaConfig(sparsity=0.5, targets=("re:.*mlp",)),
            sl.TEALConfig(sparsity=0.4, max_tokens=64),
        ),
        attention=AttentionSpec(prefill=sl.SinkWindow(sink=16, window=16, block=16, min_length=32)),
    )
    assert parse_recipe(yaml.safe_load(COMPOSED_YAML)) == python
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(3))
    logits = []
    for recipe in (yaml.safe_load(COMPOSED_YAML), python):
        model = tiny_model("llama")
        dense = _logits(model, ids)
        report = sl.sparsify(model, recipe, calib_ids)
        with sl.attention(model, recipe):
            logits.append(_logits(model, ids))
        assert report.sparsity == pytest.approx(0.5, abs=0.01)
        assert not torch.equal(logits[-1], dense)
    assert torch.equal(*logits)


def test_save_load_keeps_weight_and_activation_sparsity(calib_ids, tmp_path):
    """`sl.save` of a weight + activation recipe reloads to the same logits (the thresholds
    are saved beside the plain checkpoint and re-applied by `sl.load`)."""
    from sparsellm.models.tiny import byte_tokenizer

    model = tiny_model("llama")
    report = sl.sparsify(model, ["sparsegpt:sparsity=0.5", "teal:sparsity=0.4"], calib_ids)
    ids = calib_ids[:2]
    expected = _logits(model, ids)
    sl.save(model, byte_tokenizer(), tmp_path / "out", {"recipe": report.recipe.to_dict()})
    loaded = sl.load(tmp_path / "out").model
    assert torch.equal(_logits(loaded, ids), expected)
    with pytest.raises(SparseLLMError, match="no activation step"):
        sl.save(model, byte_tokenizer(), tmp_path / "bad", {})


def test_composed_recipe_same_from_cli_and_python(tiny_dir, text_file, tmp_path):
    """`sparsellm prune --recipe` of the composed recipe saves a model whose logits (inside
    the recipe's attention) equal those of `sl.sparsify` on the same model and windows."""
    import yaml

    from sparsellm.cli import main
    from tests.cli import cli_args

    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(COMPOSED_YAML)
    out = tmp_path / "cli-run"
    assert main(cli_args("prune", tiny_dir, text_file, "--recipe", str(recipe_file), out=out)) == 0
    saved = sl.load(out).model

    loaded = sl.load_model(str(tiny_dir))
    calib = sl.calibration(loaded.tokenizer, str(text_file), nsamples=4, seqlen=64)
    recipe = yaml.safe_load(COMPOSED_YAML)
    sl.sparsify(loaded.model, recipe, calib)
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(3))
    logits = []
    for model in (saved, loaded.model):
        with sl.attention(model, recipe):
            logits.append(_logits(model, ids))
    assert torch.equal(*logits)
