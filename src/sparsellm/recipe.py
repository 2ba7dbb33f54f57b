"""Recipes: weight, structured and activation steps plus sparse attention, as one value.

A recipe is read from YAML/JSON, from Python lists/dicts, or built from configs; every
spelling resolves to the same frozen `Recipe`::

    steps:
      - {method: wanda, sparsity: 0.5, targets: ["re:.*mlp"]}   # weights
      - "teal:sparsity=0.4"                                      # activation (a spec string)
    attention: {prefill: "sink_window:sink=64,window=1024", kv: snapkv}

A bare list is the ``steps``; a bare ``attention:`` spec goes to ``prefill`` or ``kv`` by
its method's family. Steps run in order (`sparsellm.sparsify`); the prefill method runs
whenever the model is evaluated inside `sparsellm.methods.attention`, the KV method while it
decodes. Unknown methods and keys are errors that list what is valid, so a typo never
silently does nothing. `Recipe.to_dict()` is what manifests store, and
`parse_recipe(recipe.to_dict()) == recipe`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sparsellm.config import MethodConfig, to_config
from sparsellm.errors import SparseLLMError

STEP_FAMILIES = ("weights", "structured", "activation")
ATTENTION_FAMILIES = ("prefill", "kv")


@dataclass(frozen=True)
class AttentionSpec:
    """A recipe's ``attention:``: a sparse prefill method and/or a KV-cache method."""

    prefill: MethodConfig | None = None
    kv: MethodConfig | None = None

    def __bool__(self) -> bool:
        return self.prefill is not None or self.kv is not None

    def to_dict(self) -> dict[str, dict[str, Any] | None]:
        return {k: None if c is None else c.to_dict() for k, c in self.items()}

    def items(self) -> list[tuple[str, MethodConfig | None]]:
        return [("prefill", self.prefill), ("kv", self.kv)]


@dataclass(frozen=True)
class Recipe:
    """Ordered sparsification steps plus the attention methods to run the result with."""

    steps: tuple[MethodConfig, ...] = ()
    attention: AttentionSpec = AttentionSpec()

    def to_dict(self) -> dict[str, Any]:
        return {"steps": [s.to_dict() for s in self.steps], "attention": self.attention.to_dict()}

    def of(self, family: str) -> list[MethodConfig]:
        """The steps of one family, in order."""
        return [s for s in self.steps if s.family == family]


def parse_attention(raw: Any) -> AttentionSpec:
    """A spec string (family decides prefill/kv), a ``{prefill, kv}`` mapping, or None."""
    if raw is None:
        return AttentionSpec()
    if isinstance(raw, AttentionSpec):
        return raw
    if isinstance(raw, str | MethodConfig):
        cfg = to_config(raw, ATTENTION_FAMILIES)
        return AttentionSpec(**{cfg.family: cfg})
    if not isinstance(raw, dict) or set(raw) - {"prefill", "kv"}:
        raise SparseLLMError(
            f"recipe attention must be a spec string or a mapping with keys prefill, kv; "
            f"got {raw!r}"
        )
    return AttentionSpec(
        **{k: None if v is None else to_config(v, k) for k, v in raw.items() if v is not None}
    )


def parse_recipe(raw: Any) -> Recipe:
    """Resolve any recipe spelling (see the module docstring) into a validated Recipe."""
    if isinstance(raw, Recipe):
        return raw
    attention: Any = None
    if isinstance(raw, dict) and ("steps" in raw or "attention" in raw):
        extra = set(raw) - {"steps", "attention"}
        if extra:
            raise SparseLLMError(f"unknown recipe key(s) {sorted(extra)}; valid: steps, attention")
        attention = raw.get("attention")
        raw = raw.get("steps") or []
    if isinstance(raw, dict | str | MethodConfig):
        raw = [raw]
    if not isinstance(raw, list | tuple):
        raise SparseLLMError(f"a recipe must be a list of steps, got {type(raw).__name__}")
    recipe = Recipe(tuple(to_config(s, STEP_FAMILIES) for s in raw), parse_attention(attention))
    if not recipe.steps and not recipe.attention:
        raise SparseLLMError("a recipe needs at least one step or an attention method")
    return recipe


def read_recipe(path: str | Path) -> Any:
    """The raw (unvalidated) content of a YAML (or JSON, a YAML subset) recipe file."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SparseLLMError(f"recipe file {path} does not exist") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SparseLLMError(f"recipe file {path} is not valid YAML: {exc}") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file."""
    return parse_recipe(read_recipe(path))
