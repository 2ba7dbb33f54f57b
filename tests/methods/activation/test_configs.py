"""The activation methods' configs: registered names, keys, spec and dict round trips."""

from __future__ import annotations

from typing import Any

import pytest

from sparsellm.config import build, from_dict, from_spec, spec_keys
from sparsellm.errors import SparseLLMError
from sparsellm.methods.activation.base import ActivationConfig, ActivationMethod
from sparsellm.methods.activation.cats import CATS, CATSConfig
from sparsellm.methods.activation.rsparse import RSparse, RSparseConfig
from sparsellm.methods.activation.teal import TEAL, TEALConfig
from sparsellm.methods.activation.wina import WINA, WINAConfig
from sparsellm.registry import config_class, handler, names

# a value differing from the default for every key an activation config has; a method
# with a key of its own must add one here, so its round trip covers that key too
CHANGED: dict[str, Any] = {
    "sparsity": 0.3,
    "allocation": "uniform",
    "nsamples": 3,
    "seqlen": 64,
    "max_tokens": 32,
    "seed": 7,
    "head": True,
    "rank": 8,
}
# keys a method pins to one value (DeltaLLM: uniform levels, no head), left out of its
# round trip of changed values
PINNED: dict[str, set[str]] = {"deltallm": {"allocation", "head"}}


def test_the_four_methods_are_registered_with_their_handlers() -> None:
    expected = {
        "teal": (TEALConfig, TEAL),
        "wina": (WINAConfig, WINA),
        "rsparse": (RSparseConfig, RSparse),
        "cats": (CATSConfig, CATS),
    }
    assert set(expected) <= set(names("activation"))
    for name, (cfg_cls, method_cls) in expected.items():
        assert config_class(name, "activation") is cfg_cls
        assert handler(cfg_cls()) is method_cls
    assert CATS.target == "gate" and TEAL.target == "inputs"


def test_only_rsparse_has_a_rank() -> None:
    assert [n for n in names("activation") if "rank" in spec_keys(config_class(n))] == ["rsparse"]
    with pytest.raises(SparseLLMError, match=r"unknown key.*rank.*valid: sparsity"):
        from_dict({"method": "teal", "rank": 4}, family="activation")
    assert from_spec("rsparse:sparsity=0.4,rank=8") == RSparseConfig(sparsity=0.4, rank=8)


@pytest.mark.parametrize("name", names("activation"))
def test_every_activation_config_round_trips(name: str) -> None:
    cls = config_class(name, "activation")
    assert issubclass(cls, ActivationConfig) and cls.family == "activation"
    assert issubclass(handler(cls()), ActivationMethod)
    keys = [k for k in spec_keys(cls) if k not in PINNED.get(name, set())]
    assert set(keys) <= set(CHANGED), f"add a non-default value for {name}'s new keys"
    for cfg in (cls(), build(cls, {k: CHANGED[k] for k in keys})):
        assert from_spec(cfg.to_spec()) == cfg
        assert from_spec(cfg.to_spec(), family="activation") == cfg
        assert from_dict(cfg.to_dict(), family="activation") == cfg
    changed = build(cls, {k: CHANGED[k] for k in keys})
    assert changed.to_spec().startswith(f"{name}:") and all(
        f"{k}=" in changed.to_spec() for k in keys
    )
    assert cls().to_spec() == name  # nothing differs from the defaults


def test_unknown_and_other_family_names_are_errors() -> None:
    with pytest.raises(SparseLLMError, match=r"unknown method 'nope'.*valid: .*teal"):
        from_spec("nope:sparsity=0.5", family="activation")
    with pytest.raises(SparseLLMError, match="activation sparsity must be in"):
        from_spec("teal:sparsity=0.99")
