"""The one method table: config type -> handler, filled by the `@register` decorator.

As in torchao's ``quantize_(model, config)``, the type of a config picks the code that
applies it. A method module declares its frozen config (a `MethodConfig` subclass with a
`name` and a `family`) and decorates its handler with ``@register(TheConfig)``; nothing
else is edited. The family packages are imported on the first lookup (not when
`sparsellm` is imported), so a new file in one of them is found without an import list.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, TypeVar

from sparsellm.config import FAMILIES, MethodConfig
from sparsellm.errors import SparseLLMError

# the packages whose modules may declare methods (searched once, on first lookup)
METHOD_PACKAGES = (
    "sparsellm.methods.weights",
    "sparsellm.methods.structured",
    "sparsellm.methods.activation",
    "sparsellm.methods.attention",
)

_HANDLERS: dict[type[MethodConfig], Any] = {}
_CONFIGS: dict[str, type[MethodConfig]] = {}
_discovered = False

H = TypeVar("H")


def register(config_cls: type[MethodConfig]) -> Any:
    """Class/function decorator: `config_cls` is applied by the decorated handler."""
    if not (isinstance(config_cls, type) and issubclass(config_cls, MethodConfig)):
        raise TypeError(f"@register takes a MethodConfig subclass, got {config_cls!r}")
    if not config_cls.name or config_cls.family not in FAMILIES:
        raise TypeError(f"{config_cls.__name__} needs a name and a family in {FAMILIES}")

    def decorate(handler: H) -> H:
        other = _CONFIGS.get(config_cls.name)
        if other is not None and other is not config_cls:
            raise TypeError(
                f"method name {config_cls.name!r} is taken by {other.__qualname__} "
                f"and {config_cls.__qualname__}"
            )
        _CONFIGS[config_cls.name] = config_cls
        _HANDLERS[config_cls] = handler
        return handler

    return decorate


def discover() -> None:
    """Import every module of the method packages once, so their decorators have run."""
    global _discovered
    if _discovered:
        return
    for pkg_name in METHOD_PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{pkg_name}."):
            importlib.import_module(info.name)
    _discovered = True


def _families(family: str | tuple[str, ...] | None) -> tuple[str, ...]:
    if family is None:
        return FAMILIES
    return (family,) if isinstance(family, str) else tuple(family)


def names(family: str | tuple[str, ...] | None = None) -> list[str]:
    """Registered method names (of `family`), sorted."""
    discover()
    fams = _families(family)
    return sorted(n for n, c in _CONFIGS.items() if c.family in fams)


def config_class(name: str, family: str | tuple[str, ...] | None = None) -> type[MethodConfig]:
    """The config class of method `name`; the error lists the valid names."""
    discover()
    cls = _CONFIGS.get(name)
    fams = _families(family)
    if cls is None or cls.family not in fams:
        what = " or ".join(fams) if family is not None else "any family"
        raise SparseLLMError(
            f"unknown method {name!r} ({what}); valid: {', '.join(names(fams)) or '(none)'}"
        )
    return cls


def handler(config: MethodConfig) -> Any:
    """The handler registered for `config`'s type (or its nearest registered base)."""
    discover()
    for cls in type(config).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
    raise SparseLLMError(f"no handler is registered for {type(config).__qualname__}")


def config_classes(family: str | tuple[str, ...] | None = None) -> list[type[MethodConfig]]:
    """Every registered config class (of `family`), ordered by method name."""
    return [_CONFIGS[n] for n in names(family)]
