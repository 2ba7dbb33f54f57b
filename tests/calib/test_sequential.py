"""Sequential calibration feeds the *pruned* outputs of block i into block i+1."""

import pytest
import torch

from sparsellm.calib.hooks import input_hooks
from sparsellm.calib.sequential import run_sequential
from sparsellm.models.adapters import block_linears, get_blocks, weight_matrix
from sparsellm.models.tiny import FAMILIES, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_block_inputs_are_outputs_of_modified_blocks(family, calib_ids):
    model = tiny_model(family)
    blocks = get_blocks(model)
    seen: dict[int, list[torch.Tensor]] = {}

    def process(i, block, forward):
        seen[i] = []
        with torch.no_grad():  # modify the block *before* its outputs are propagated
            for m in block_linears(block).values():
                weight_matrix(m)[:, ::2] = 0.0
        first = next(iter(block_linears(block).values()))
        # the first linear of a block sees the normalised block input; record the raw
        # block input instead through a pre-hook on the block itself
        h = block.register_forward_pre_hook(lambda _m, args: seen[i].append(args[0].clone()))
        try:
            with input_hooks({"first": first}, lambda _n, _x: None):
                forward()
        finally:
            h.remove()

    run_sequential(model, list(calib_ids.split(4)), process)
    with torch.no_grad():
        ref = model(input_ids=calib_ids, output_hidden_states=True, use_cache=False)
    for i in range(len(blocks)):
        got = torch.cat(seen[i])
        assert torch.allclose(got, ref.hidden_states[i], atol=1e-5), f"block {i}"


def test_blocks_restored_after_error(calib_ids):
    model = tiny_model("llama")
    originals = list(get_blocks(model))

    def boom(i, block, forward):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run_sequential(model, [calib_ids], boom)
    assert list(get_blocks(model)) == originals
    for block in originals:
        for m in block.modules():
            assert not m._forward_hooks and not m._forward_pre_hooks


def test_bf16_forwards_keep_fp32_master_weights(calib_ids):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_sequential(model, [calib_ids], lambda i, b, f: f(), dtype=torch.bfloat16)
    for k, v in model.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
