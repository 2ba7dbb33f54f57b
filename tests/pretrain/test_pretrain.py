import pytest
import torch

from sparsellm.errors import SparseLLMError
from sparsellm.models.tiny import tiny_model
from sparsellm.pretrain.journey import GradualMagnitude, average_params, cubic_sparsity
from sparsellm.pretrain.spdf import random_masks, train_flops
from sparsellm.pretrain.train import TrainConfig, eval_loss, linear_weights, lr_at, train_lm


def _data(n: int = 32, seqlen: int = 32) -> torch.Tensor:
    """A repetitive byte sequence: a tiny model learns it within a few dozen steps."""
    pattern = torch.tensor(list(b"the cat sat on the mat. "), dtype=torch.long)
    return pattern.repeat(n * seqlen // len(pattern) + 1)[: n * seqlen].view(n, seqlen)


def test_cubic_schedule_by_hand():
    assert cubic_sparsity(0, 100, 0.8) == 0.0
    assert cubic_sparsity(24, 100, 0.8) == 0.0
    assert cubic_sparsity(50, 100, 0.8) == pytest.approx(0.8 * (1 - 0.5**3))  # 0.7
    assert cubic_sparsity(75, 100, 0.8) == 0.8 and cubic_sparsity(99, 100, 0.8) == 0.8
    with pytest.raises(SparseLLMError):
        cubic_sparsity(0, 100, 0.5, begin=0.8, end=0.2)


def test_average_params_and_flops_by_hand():
    assert average_params([10, 20, 30]) == 20
    assert train_flops(10, 5) == 300
    with pytest.raises(SparseLLMError):
        average_params([])


def test_lr_warms_up_then_decays_to_a_tenth():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=10)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)


def test_random_masks_keep_an_exact_seeded_fraction():
    model = tiny_model("llama")
    masks = random_masks(model, 0.75, seed=3)
    for name, w in linear_weights(model).items():
        keep = masks.masks[name][1]
        assert int(keep.sum()) == round(0.25 * w.numel())
        assert (w[~keep] == 0).all()
    again = random_masks(tiny_model("llama"), 0.75, seed=3)
    assert all(torch.equal(again.masks[n][1], m[1]) for n, m in masks.masks.items())
    with pytest.raises(SparseLLMError):
        random_masks(model, 1.0)


def test_sparse_pretraining_keeps_zeros_then_dense_finetuning_revives_them():
    model = tiny_model("llama")
    data = _data()
    masks = random_masks(model, 0.5)
    before = eval_loss(model, data)
    log = train_lm(model, data, TrainConfig(steps=30, batch_size=4, lr=1e-2, warmup=2), masks)
    assert eval_loss(model, data) < before
    assert log.kept == [masks.kept()] * 30
    for w, keep in masks.masks.values():
        assert (w[~keep] == 0).all()
    train_lm(model, data, TrainConfig(steps=5, batch_size=4, lr=1e-2, warmup=1))  # no masks
    revived = sum(int((w[~keep] != 0).sum()) for w, keep in masks.masks.values())
    assert revived > 0


def test_gradual_magnitude_keeps_the_largest_weights():
    model = tiny_model("llama")
    masks = GradualMagnitude(model, final=0.5, total=20, every=5)
    name = "model.layers.0.mlp.down_proj.weight"
    w = masks.masks[name][0]
    full = sum(w.numel() for w in linear_weights(model).values())
    masks.update(0)  # the schedule starts at 25%: nothing pruned yet
    assert masks.kept() == full
    before = w.detach().clone()
    masks.update(15)  # the schedule's end (75%): the final sparsity
    keep = masks.masks[name][1]
    assert int(keep.sum()) == round(0.5 * w.numel())
    assert before[keep].abs().min() >= before[~keep].abs().max()


def test_gradual_pruning_follows_the_schedule_while_training():
    model = tiny_model("llama")
    masks = GradualMagnitude(model, final=0.5, total=20, every=5)
    full = masks.kept()
    log = train_lm(model, _data(), TrainConfig(steps=20, batch_size=4, lr=1e-2, warmup=1), masks)
    assert log.kept[:10] == [full] * 10  # dense until the first pruning step past 25%
    assert log.kept == sorted(log.kept, reverse=True) and full > log.kept[10] > log.kept[-1]
    assert log.kept[-1] == pytest.approx(full / 2, rel=0.01)
    assert full / 2 < average_params(log.kept) < full
    for w, keep in masks.masks.values():
        assert (w[~keep] == 0).all()
