"""Recipes: an ordered list of validated steps, read from YAML/JSON or Python dicts.

    - method: wanda
      sparsity: 0.5
      pattern: "2:4"
      targets: ["re:.*mlp"]
      ignore: ["lm_head"]

A file may also be a mapping with a ``steps:`` list and an optional ``attention:`` key
that adds sparse attention on top of the weight sparsity::

    steps: [{method: wanda, sparsity: 0.5}]
    attention: "sink_window:sink=64,window=1024"     # or {prefill: SPEC, kv: SPEC}

A bare spec goes to ``prefill`` or ``kv`` by the method's kind. The prefill method runs
whenever the pruned model is evaluated; the KV-cache method acts only while decoding, so
here it is validated and recorded; generation uses both with
``sparse_attention(model, recipe.kv, prefill=recipe.prefill or None)``. Unknown keys are
errors that list the valid keys, so typos never silently do nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sparsellm.errors import SparseLLMError
from sparsellm.registry import lookup
from sparsellm.weights.base import WeightPruneConfig


@dataclass(frozen=True)
class Step:
    """One resolved recipe step: the method name and its validated config."""

    method: str
    config: WeightPruneConfig

    def to_dict(self) -> dict[str, Any]:
        d = {"method": self.method, **dataclasses.asdict(self.config)}
        d["sparsity"] = self.config.target_sparsity
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def parse_step(raw: dict[str, Any]) -> Step:
    """Validate one step mapping."""
    if not isinstance(raw, dict) or "method" not in raw:
        raise SparseLLMError(f"a recipe step must be a mapping with a 'method' key, got {raw!r}")
    raw = dict(raw)
    method = raw.pop("method")
    config_cls, _ = lookup(method)
    valid = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise SparseLLMError(
            f"unknown key(s) {', '.join(unknown)} for method {method!r}; valid: "
            f"method, {', '.join(valid)}"
        )
    for key in ("targets", "ignore"):
        if isinstance(raw.get(key), list):
            raw[key] = tuple(raw[key])
    try:
        return Step(method=method, config=config_cls(**raw))
    except TypeError as exc:
        raise SparseLLMError(f"bad value in recipe step for {method!r}: {exc}") from None


@dataclass(frozen=True)
class AttentionRecipe:
    """A recipe's ``attention:`` key: specs ``NAME[:key=value,...]`` of a sparse prefill
    method and/or a KV-cache method (empty = none)."""

    prefill: str = ""
    kv: str = ""

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def _is_wrapped(raw: Any) -> bool:
    return isinstance(raw, dict) and ("steps" in raw or "attention" in raw)


def parse_recipe(raw: Any, allow_empty: bool = False) -> list[Step]:
    """A list of step mappings (or ``{"steps": [...], "attention": ...}``, or a single step
    mapping). `allow_empty` accepts a recipe without steps (attention only)."""
    if _is_wrapped(raw):
        extra = set(raw) - {"steps", "attention"}
        if extra:
            raise SparseLLMError(f"unknown recipe key(s) {sorted(extra)}; valid: steps, attention")
        raw = raw.get("steps", [])
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or not (raw or allow_empty):
        raise SparseLLMError("a recipe must be a non-empty list of steps")
    return [s if isinstance(s, Step) else parse_step(s) for s in raw]


def recipe_attention(raw: Any) -> AttentionRecipe | None:
    """The validated ``attention:`` key of a raw recipe, or None when it has none."""
    from sparsellm.attention.hf import KV_METHODS, parse_attention

    spec = raw.get("attention") if _is_wrapped(raw) else None
    if spec is None:
        return None
    if isinstance(spec, str):
        kind = "kv" if isinstance(parse_attention(spec), tuple(KV_METHODS.values())) else "prefill"
        spec = {kind: spec}
    if not isinstance(spec, dict) or set(spec) - {"prefill", "kv"} or not spec:
        raise SparseLLMError(
            f"recipe attention must be a spec string or a mapping with keys prefill, kv; "
            f"got {spec!r}"
        )
    for kind, text in spec.items():
        is_kv = isinstance(parse_attention(str(text)), tuple(KV_METHODS.values()))
        if is_kv != (kind == "kv"):
            raise SparseLLMError(f"recipe attention {kind}: {text!r} is not a {kind} method")
    return AttentionRecipe(**{k: str(v) for k, v in spec.items()})


def read_recipe(path: str | Path) -> Any:
    """The raw (unvalidated) content of a YAML (or JSON, a YAML subset) recipe file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SparseLLMError(f"recipe file {path} does not exist") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SparseLLMError(f"recipe file {path} is not valid YAML: {exc}") from None
    return raw


def load_recipe(path: str | Path) -> list[Step]:
    """Read and validate the steps of a recipe file."""
    return parse_recipe(read_recipe(path))
