"""Method configs and the one ``name:key=value,...`` spec parser.

Every method of every family is described by a frozen dataclass that subclasses
`MethodConfig` and names itself with the class attributes `name` (what users type) and
`family` (which framework applies it: ``weights``, ``structured``, ``activation``,
``prefill`` or ``kv``). The same parser serves the CLI (``--method wanda:sparsity=0.5``),
YAML recipes (``{method: wanda, sparsity: 0.5}``) and Python (``WandaConfig(0.5)``), so
a method's keys, types and defaults are declared exactly once: on its dataclass.

Spec grammar: ``NAME[:KEY=VALUE[,KEY=VALUE...]]``; a value in square brackets is a list
(``targets=[re:.*mlp,lm_head]``), ``none`` is None, booleans are true/false. Values are
converted by the field's declared type, never guessed (YAML would read ``2:4`` as 124).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from sparsellm.errors import SparseLLMError

FAMILIES = ("weights", "structured", "activation", "prefill", "kv")


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's config: a frozen value naming its method and family.

    Fields whose default is an empty tuple of numbers (e.g. MInference's calibrated
    per-head choice) are state, not user keys: neither the spec parser nor `to_dict`
    offers them (see `spec_keys`); a calibration step fills them.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """``{"method": name, field: value, ...}``: JSON-ready, and `from_dict` inverts it."""
        out: dict[str, Any] = {"method": self.name}
        for key in spec_keys(type(self)):
            value = getattr(self, key)
            out[key] = list(value) if isinstance(value, tuple) else value
        return out

    def to_spec(self) -> str:
        """The spec string of the keys that differ from their defaults."""
        parts = []
        for key in spec_keys(type(self)):
            f = next(f for f in dataclasses.fields(self) if f.name == key)
            value = getattr(self, key)
            if f.default is not dataclasses.MISSING and value == f.default:
                continue
            parts.append(f"{key}={_format(value)}")
        return self.name + (":" + ",".join(parts) if parts else "")


def _format(value: Any) -> str:
    if isinstance(value, tuple | list):
        return "[" + ",".join(_format(v) for v in value) + "]"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def spec_keys(cls: type[MethodConfig]) -> list[str]:
    """User-settable keys of a config class (calibrated tuple tables excluded)."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if isinstance(f.default, tuple) and f.default == () and not _is_str_tuple(hints[f.name]):
            continue  # a calibrated table (filled by a calibration step), not a knob
        keys.append(f.name)
    return keys


def _is_str_tuple(hint: Any) -> bool:
    return typing.get_origin(hint) is tuple and typing.get_args(hint)[:1] == (str,)


def split_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"name:k=v,k=[a,b]"`` -> (name, {k: raw text}); commas inside [] do not split."""
    if not isinstance(spec, str) or not spec.strip():
        raise SparseLLMError(f"a method spec must be a non-empty string, got {spec!r}")
    name, _, params = spec.strip().partition(":")
    items, depth, cur = [], 0, ""
    for ch in params:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    raw: dict[str, str] = {}
    for item in filter(None, (i.strip() for i in items)):
        key, eq, value = item.partition("=")
        if not eq:
            raise SparseLLMError(f"{name}: bad parameter {item!r}; write key=value")
        if key.strip() in raw:
            raise SparseLLMError(f"{name}: key {key.strip()!r} given twice")
        raw[key.strip()] = value.strip()
    return name.strip(), raw


def coerce(hint: Any, raw: str, where: str) -> Any:
    """Convert spec text `raw` to the declared type `hint` (errors name `where`)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(inner[0], raw, where)
    if origin is tuple:
        body = raw[1:-1] if raw.startswith("[") and raw.endswith("]") else raw
        parts = [p.strip() for p in body.split(",")] if body.strip() else []
        return tuple(coerce(args[0], p, where) for p in parts)
    if hint is bool:
        low = raw.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise SparseLLMError(f"{where} must be true or false, got {raw!r}")
    if hint in (int, float):
        try:
            return hint(raw)
        except ValueError:
            raise SparseLLMError(f"{where} must be {hint.__name__}, got {raw!r}") from None
    return raw


def build(cls: type[MethodConfig], values: dict[str, Any]) -> MethodConfig:
    """`cls(**values)` with unknown keys and bad values turned into clear errors.

    Lists become tuples and integers given for float fields become floats, so a YAML
    recipe, a spec string and Python produce the very same (equal, hashable) config.
    """
    keys = spec_keys(cls)
    unknown = sorted(set(values) - set(keys))
    if unknown:
        raise SparseLLMError(
            f"unknown key(s) {', '.join(unknown)} for method {cls.name!r}; valid: "
            f"{', '.join(keys) or '(none)'}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if isinstance(value, str) and hints[key] is not str:
            value = coerce(hints[key], value, f"{cls.name}: {key}")
        elif isinstance(value, list):
            value = tuple(value)
        elif isinstance(value, int) and not isinstance(value, bool) and float in _types(hints[key]):
            value = float(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise SparseLLMError(f"bad value for method {cls.name!r}: {exc}") from None


def _types(hint: Any) -> tuple[Any, ...]:
    args = typing.get_args(hint)
    return args if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def from_spec(spec: str, family: str | tuple[str, ...] | None = None) -> MethodConfig:
    """Parse ``NAME[:key=value,...]`` into that method's config (optionally of `family`)."""
    from sparsellm.registry import config_class

    name, raw = split_spec(spec)
    return build(config_class(name, family), raw)


def from_dict(raw: dict[str, Any], family: str | tuple[str, ...] | None = None) -> MethodConfig:
    """A recipe step mapping ``{method: NAME, key: value, ...}`` -> the method's config."""
    from sparsellm.registry import config_class

    if not isinstance(raw, dict) or "method" not in raw:
        raise SparseLLMError(f"a recipe step must be a mapping with a 'method' key, got {raw!r}")
    values = dict(raw)
    return build(config_class(str(values.pop("method")), family), values)


def to_config(
    step: MethodConfig | dict[str, Any] | str, family: str | tuple[str, ...] | None = None
) -> MethodConfig:
    """Any of the three spellings of a step (config, mapping, spec string) -> a config."""
    if isinstance(step, MethodConfig):
        if family is not None and step.family not in _as_tuple(family):
            raise SparseLLMError(f"{step.name!r} is a {step.family} method, not {family}")
        return step
    if isinstance(step, str):
        return from_spec(step, family)
    return from_dict(step, family)


def _as_tuple(family: str | tuple[str, ...]) -> tuple[str, ...]:
    return (family,) if isinstance(family, str) else family
