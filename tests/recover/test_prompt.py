import copy

import pytest
import torch

from sparsellm.api import sparsify
from sparsellm.eval.zeroshot import score_pairs
from sparsellm.models.tiny import byte_tokenizer, tiny_model
from sparsellm.recover.prompt import PromptedLM, train_prompt


def test_prompt_is_hidden_from_callers(calib_ids):
    model = tiny_model("llama")
    prompted = PromptedLM(model, n_tokens=4)
    ids = calib_ids[:2]
    with torch.no_grad():
        full = prompted(input_ids=ids).logits
        plain = model(input_ids=ids).logits
        keep = torch.tensor([3, 7, 10])
        kept = prompted(input_ids=ids, logits_to_keep=keep).logits
        # the prompt's effect equals feeding its embeddings as a prefix by hand
        emb = model.get_input_embeddings()(ids)
        manual = model(inputs_embeds=torch.cat([prompted.prompt.expand(2, -1, -1), emb], 1))
    assert full.shape == plain.shape and not torch.allclose(full, plain)
    assert torch.equal(kept, full[:, keep])
    assert torch.allclose(full, manual.logits[:, 4:], atol=1e-6)
    # the zero-shot scorer works through the wrapper
    assert len(score_pairs(prompted, byte_tokenizer(), [("ab", " c")])) == 1


def test_training_lowers_kl_keeps_weights_and_round_trips(calib_ids, tmp_path):
    dense = tiny_model("llama")
    sparse = copy.deepcopy(dense)
    sparsify(sparse, [{"method": "magnitude", "sparsity": 0.7}], calib_ids)
    weights = [p.clone() for p in sparse.parameters()]
    prompted = PromptedLM(sparse, n_tokens=8)
    out = train_prompt(prompted, dense, calib_ids, steps=30, lr=3e-2, batch_size=2)
    assert out["last_loss"] < out["first_loss"]
    assert all(torch.equal(a, b) for a, b in zip(weights, sparse.parameters(), strict=True))
    prompted.save_prompt(tmp_path)
    again = PromptedLM.attach(sparse, tmp_path)
    with torch.no_grad():
        a = prompted(input_ids=calib_ids[:1]).logits
        b = again(input_ids=calib_ids[:1]).logits
    assert torch.equal(a, b)
    with pytest.raises(Exception, match="soft_prompt"):
        PromptedLM.attach(sparse, tmp_path / "nowhere")


def test_time_budget_stops_after_the_first_step(calib_ids):
    dense = tiny_model("llama")
    prompted = PromptedLM(copy.deepcopy(dense), n_tokens=4)
    out = train_prompt(prompted, dense, calib_ids, steps=30, batch_size=1, max_seconds=1e-9)
    assert out["steps"] == 1
