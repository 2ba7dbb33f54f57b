"""Every registered attention method: its config round-trips through the spec parser,
validates its parameters, and runs through the integration; at "off" it is SDPA exactly."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch

from sparsellm import registry
from sparsellm.config import from_dict, from_spec, spec_keys
from sparsellm.errors import SparseLLMError
from sparsellm.integrations.transformers import sparse_attention
from sparsellm.methods.attention.protocols import KVConfig, PrefillConfig
from sparsellm.models.tiny import tiny_model

PREFILL = [
    "anchor",
    "block_topk",
    "flexprefill",
    "hip",
    "longheads",
    "full",
    "minference",
    "moa",
    "power",
    "seer",
    "sink_window",
    "vertical_slash",
]
KV = [
    "actqkv",
    "double_sparsity",
    "h2o",
    "quest",
    "snapkv",
    "speckv",
    "streaming_kv",
    "think",
    "tidal",
]


def test_the_registry_holds_every_attention_method_under_its_family() -> None:
    assert registry.names("prefill") == sorted(PREFILL)
    assert registry.names("kv") == sorted(KV)
    for name in PREFILL + KV:
        cls = registry.config_class(name)
        base = PrefillConfig if name in PREFILL else KVConfig
        assert issubclass(cls, base) and cls.family == base.family
        assert registry.handler(cls()) is cls  # a config is its own handler


def _changed(cls: type) -> dict[str, typing.Any]:
    """A value differing from the default for every user key of `cls` (still valid)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in spec_keys(cls) and hints[f.name] is not str:  # a path: no invented one
            out[f.name] = f.default + (0.5 if hints[f.name] is float else 4)  # even: seer's dim
    return out


@pytest.mark.parametrize("name", PREFILL + KV)
def test_every_method_round_trips_through_its_spec(name: str) -> None:
    cls = registry.config_class(name, ("prefill", "kv"))
    for cfg in (cls(), cls(**_changed(cls))):
        assert from_spec(cfg.to_spec(), family=("prefill", "kv")) == cfg
        assert from_dict(cfg.to_dict(), family=cfg.family) == cfg


@pytest.mark.parametrize("name", PREFILL + KV)
def test_negative_parameters_are_refused_on_construction(name: str) -> None:
    cls = registry.config_class(name)
    key = spec_keys(cls)[0]
    with pytest.raises(SparseLLMError, match="non-negative"):
        cls(**{key: -1})


def test_families_are_kept_apart() -> None:
    with pytest.raises(SparseLLMError, match="unknown method 'snapkv' \\(prefill\\)"):
        from_spec("snapkv", family="prefill")
    with (
        pytest.raises(SparseLLMError, match="unknown method"),
        sparse_attention(tiny_model("llama", 0), "nope"),
    ):
        pass


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_every_method_at_off_is_sdpa_exactly(family: str) -> None:
    """ "Off": prefill methods below their `min_length` (default 2048), KV methods without
    their session's cache (`use_cache=False`): the logits are SDPA's, bit for bit.
    Methods with a calibrated table refuse to run without it."""
    model = tiny_model(family, 0)
    ids = torch.randint(0, 256, (1, 70), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(ids, use_cache=False).logits
        for name in PREFILL + KV:
            config = registry.config_class(name)()
            if name == "full":
                config = dataclasses.replace(config, min_length=2048)
            if config.needs_calibration():
                with (
                    pytest.raises(SparseLLMError, match="calibrated table"),
                    sparse_attention(model, config),
                ):
                    pass
                continue
            with sparse_attention(model, name if name != "full" else config):
                got = model(ids, use_cache=False).logits
            assert torch.equal(got, dense), name
            assert model.config._attn_implementation == "sdpa"
