import itertools
import json
import random
from collections import defaultdict

import pytest
import torch

from sparsellm.api import sparsify
from sparsellm.methods.weights.apply import select_targets
from sparsellm.methods.weights.evopress import evopress_layer_sparsity, level_grid, mutate
from sparsellm.methods.weights.wanda import Wanda
from sparsellm.models.tiny import tiny_model
from sparsellm.recipe import parse_recipe


def test_level_grid_is_even_and_shrinks_at_the_ends():
    assert level_grid(0.5, 0.05, 3) == pytest.approx([0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65])
    assert level_grid(0.9, 0.05, 3) == pytest.approx([0.85, 0.9, 0.95])
    assert level_grid(0.0, 0.1, 2) == [0.0]


def test_mutations_keep_each_size_groups_level_sum():
    groups = [["a", "b", "c"], ["d", "e"], ["f"]]
    levels = dict.fromkeys("abcdef", 2)
    rng = random.Random(0)
    for _ in range(50):
        child = mutate(levels, groups, 5, rng, 3)
        assert all(0 <= v < 5 for v in child.values())
        for g in groups:
            assert sum(child[x] for x in g) == sum(levels[x] for x in g)
        levels = child
    assert levels != dict.fromkeys("abcdef", 2)


def _search(model, calib_ids, **kw):
    step = parse_recipe([{"method": "wanda", "sparsity": 0.5}]).steps[0]
    selected = select_targets(model, step)
    return evopress_layer_sparsity(
        model,
        selected,
        calib_ids,
        Wanda(step),
        0.5,
        generations=kw.pop("gens", 4),
        offspring=3,
        fitness_windows=2,
        **kw,
    )


def test_search_keeps_the_global_budget_restores_weights_and_resumes(calib_ids, tmp_path):
    model = tiny_model("llama")
    before = [p.clone() for p in model.parameters()]
    full = _search(model, calib_ids)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    sizes = {n: m.weight.numel() for n, m in model.named_modules() if n in full}
    by_size = defaultdict(list)
    for fqn, s in full.items():
        by_size[sizes[fqn]].append(s)
    for values in by_size.values():
        assert sum(values) / len(values) == pytest.approx(0.5)
    assert len(set(full.values())) > 1  # the search moved away from uniform
    state = tmp_path / "evo.json"
    _search(model, calib_ids, gens=2, state_path=str(state))
    assert json.loads(state.read_text())["generation"] == 2
    resumed = _search(model, calib_ids, gens=4, state_path=str(state))
    assert resumed == full
    history = json.loads(state.read_text())["history"]
    assert len(history) == 4 and all(b <= a for a, b in itertools.pairwise(history))


def test_evopress_allocation_in_a_recipe(calib_ids):
    uniform = sparsify(tiny_model("llama"), [{"method": "wanda", "sparsity": 0.5}], calib_ids)
    report = sparsify(
        tiny_model("llama"),
        [
            {
                "method": "wanda",
                "sparsity": 0.5,
                "allocation": "evopress",
                "evo_generations": 3,
                "evo_offspring": 2,
            }
        ],
        calib_ids,
    )
    assert abs(report.sparsity - uniform.sparsity) <= 1 / 64
