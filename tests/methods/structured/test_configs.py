"""Every structured method on the one abstraction: names, spec round trips, ratio 0."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sparsellm import registry
from sparsellm.config import from_dict, from_spec, spec_keys
from sparsellm.errors import SparseLLMError
from sparsellm.methods.structured import StructuredConfig, apply_structured
from sparsellm.models.tiny import tiny_model

NAMES = (
    "taylor",
    "activation",
    "obs",
    "spectral",
    "slicegpt",
    "welore",
    "welore-sparse",
    "depth",
    "depth-ppl",
)


def test_the_names_are_those_users_type() -> None:
    assert registry.names("structured") == sorted(NAMES)
    for name in NAMES:
        cls = registry.config_class(name, "structured")
        assert issubclass(cls, StructuredConfig) and cls.family == "structured"
        assert "ratio" in spec_keys(cls)


def _changed(cfg: StructuredConfig) -> StructuredConfig:
    """`cfg` with every key off its default (bools flipped, numbers moved)."""
    values = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        values[f.name] = (not value) if isinstance(value, bool) else round(value + 0.15, 2)
    return dataclasses.replace(cfg, **values)


@pytest.mark.parametrize("name", NAMES)
def test_spec_and_dict_round_trip(name: str) -> None:
    default = from_spec(name, "structured")
    assert default.name == name and default.ratio == 0.2
    for cfg in (default, _changed(default)):
        assert from_spec(cfg.to_spec()) == cfg
        assert from_dict(cfg.to_dict(), "structured") == cfg
    assert _changed(default).to_spec().startswith(f"{name}:ratio=0.35")


def test_welore_defaults_differ_only_in_sparse_share() -> None:
    assert from_spec("welore").sparse_share == 0.0
    assert from_spec("welore-sparse").sparse_share == 0.25
    assert from_spec("welore-sparse") != from_spec("welore:sparse_share=0.25")  # other method


@pytest.mark.parametrize("name", NAMES)
def test_ratio_zero_keeps_logits(name: str, calib_ids: torch.Tensor) -> None:
    """Nothing removed, function unchanged: bit for bit, except SliceGPT, whose ratio 0 is
    the rotation alone: exact up to rounding, and each block gains its two 64x64 shortcuts
    (2·4096 on a 36992-parameter block: q,o 4096, k,v 2048, gate,up,down 8192, norms 128)."""
    model = tiny_model("llama")
    ref = model(calib_ids).logits
    report = apply_structured(model, {"method": name, "ratio": 0}, calib_ids)
    assert report["method"] == name and report["ratio"] == 0.0
    assert report["block_params_before"] == 2 * 36992
    assert report["seconds"] >= 0 and isinstance(report["layer_shapes"], list)
    logits = model(calib_ids).logits
    if name == "slicegpt":
        assert report["measured_ratio"] == pytest.approx(-2 * 4096 / 36992)
        assert torch.allclose(logits, ref, atol=1e-4, rtol=1e-5)
    else:
        assert report["block_params_after"] == report["block_params_before"]
        assert report["measured_ratio"] == 0
        assert torch.equal(logits, ref)


def test_other_families_are_refused(calib_ids: torch.Tensor) -> None:
    model = tiny_model("llama")
    with pytest.raises(SparseLLMError, match="unknown method 'wanda'"):
        apply_structured(model, "wanda", calib_ids)
    weights_config = from_spec("wanda", "weights")
    with pytest.raises(SparseLLMError, match="weights method, not structured"):
        apply_structured(model, weights_config, calib_ids)


@pytest.mark.parametrize("bad", ["obs:ratio=1", "obs:ratio=-0.1", "welore:sparse_share=1"])
def test_bad_values_are_refused_at_construction(bad: str) -> None:
    with pytest.raises(SparseLLMError, match=r"ratio|sparse_share"):
        from_spec(bad)
