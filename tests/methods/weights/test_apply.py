import torch

from sparsellm.calib.hooks import input_hooks
from sparsellm.methods.weights.apply import SharedInputStats, matches
from sparsellm.methods.weights.base import Hessian
from sparsellm.models.adapters import block_linears
from sparsellm.models.tiny import tiny_model


def test_layers_reading_one_input_share_statistics(calib_ids):
    model = tiny_model("llama")
    block = model.model.layers[0]
    linears = block_linears(block)
    shared = SharedInputStats(Hessian)
    separate = {n: Hessian(m.in_features) for n, m in linears.items()}
    with (
        input_hooks(linears, shared.update),
        input_hooks(linears, lambda n, x: separate[n].update(x)),
        torch.no_grad(),
    ):
        for ids in calib_ids.split(4):  # two batches: sharing must stay consistent
            model(input_ids=ids)
    st = shared.stats
    attn, mlp = "self_attn.", "mlp."
    assert st[attn + "q_proj"] is st[attn + "k_proj"] is st[attn + "v_proj"]
    assert st[mlp + "gate_proj"] is st[mlp + "up_proj"]
    assert len({id(v) for v in st.values()}) == 4  # qkv, o, gate/up, down
    for name, ref in separate.items():
        assert st[name].tokens == ref.tokens == calib_ids.numel()
        assert torch.allclose(st[name].value, ref.value)


def test_matches():
    name = "model.layers.3.mlp.down_proj"
    assert matches(name, ("down_proj",))
    assert matches(name, ("re:.*mlp",))
    assert not matches(name, ("proj",))  # suffixes match whole dotted components
    assert not matches(name, ("re:mlp",))  # re.match anchors at the start
