"""Recipes: an ordered list of validated steps, read from YAML/JSON or Python dicts.

    - method: wanda
      sparsity: 0.5
      pattern: "2:4"
      targets: ["re:.*mlp"]
      ignore: ["lm_head"]

A file may also be a mapping with a single ``steps:`` list. Unknown keys are errors
that list the valid keys for that method, so typos never silently do nothing.
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


def parse_recipe(raw: Any) -> list[Step]:
    """A list of step mappings (or ``{"steps": [...]}``, or a single step mapping)."""
    if isinstance(raw, dict) and "steps" in raw:
        extra = set(raw) - {"steps"}
        if extra:
            raise SparseLLMError(f"unknown recipe key(s) {sorted(extra)}; valid: steps")
        raw = raw["steps"]
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise SparseLLMError("a recipe must be a non-empty list of steps")
    return [s if isinstance(s, Step) else parse_step(s) for s in raw]


def load_recipe(path: str | Path) -> list[Step]:
    """Read and validate a YAML (or JSON, a YAML subset) recipe file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SparseLLMError(f"recipe file {path} does not exist") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SparseLLMError(f"recipe file {path} is not valid YAML: {exc}") from None
    return parse_recipe(raw)
