"""CoreInfer: hand-checked core selection; HF wrapper and runtime agree."""

from __future__ import annotations

import torch

from sparsellm.methods.activation.coreinfer import (
    CoreActivation,
    apply_coreinfer,
    core_neurons,
    reset_cores,
    split_perplexity,
    unwrap_coreinfer,
)
from sparsellm.models.tiny import tiny_model
from sparsellm.runtime.decode import DecodeRuntime


def test_core_neurons_hand_checked() -> None:
    acts = torch.tensor([[3.0, 1.0, 0.0, 2.0], [0.0, 1.0, 4.0, 2.0]])
    # token-wise top-2: {0, 3} and {2, 3}; counts [1, 0, 1, 2]; the tie between 0 and 2
    # goes to the larger summed activation (neuron 2: 4 > 3)
    assert core_neurons(acts, 0.5, 0.5).tolist() == [False, False, True, True]
    assert core_neurons(acts, 0.5, 0.75).tolist() == [False, False, False, True]
    assert core_neurons(acts, 0.5, 0.0).all()


def test_runtime_matches_wrapped_hf_decode() -> None:
    model = tiny_model("llama").eval()
    ids = torch.randint(0, 256, (1, 14), generator=torch.Generator().manual_seed(5))
    apply_coreinfer(model, sparsity=0.5)
    with torch.no_grad():
        reset_cores(model)
        first = model(ids[:, :8], use_cache=True)  # the prompt sets the cores
        rest = model(ids[:, 8:], past_key_values=first.past_key_values, use_cache=True).logits
    rt = DecodeRuntime(model, max_len=32)
    rt.reset(1)
    rt.forward(ids[:, :8], 0, sparse=True)
    steps = [rt.forward(ids[:, i : i + 1], i, sparse=True) for i in range(8, 14)]
    torch.testing.assert_close(torch.cat(steps, dim=1), rest, rtol=1e-4, atol=1e-5)
    assert 0.45 < rt.skipped_fraction() < 0.55


def test_split_perplexity_dense_at_zero_and_unwrap() -> None:
    model = tiny_model("llama").eval()
    windows = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(6))
    dense = split_perplexity(model, windows, 12)
    apply_coreinfer(model, sparsity=0.0)
    assert split_perplexity(model, windows, 12) == dense
    unwrap_coreinfer(model)
    apply_coreinfer(model, sparsity=0.7)
    assert split_perplexity(model, windows, 12) != dense
    unwrap_coreinfer(model)
    assert split_perplexity(model, windows, 12) == dense


def test_core_is_ranked_by_the_magnitude_of_the_down_input() -> None:
    down = torch.nn.Linear(4, 2, bias=False)
    wrapper = CoreActivation(down, sparsity=0.5, token_keep=0.5)
    prompt = torch.tensor([[[-5.0, 0.1, 3.0, 0.2], [-4.0, 0.0, 2.0, 0.3]]])
    assert torch.equal(wrapper(prompt), down(prompt))  # the prompt runs dense
    assert wrapper.core.tolist() == [True, False, True, False]  # -5 counts by magnitude
    h = torch.ones(1, 1, 4)
    torch.testing.assert_close(wrapper(h), down(h * torch.tensor([1.0, 0.0, 1.0, 0.0])))
